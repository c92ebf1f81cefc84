"""Where a training step's time goes: torch.profiler over lmtune's own run, the benchmark's flags.

    python bench/profile_step.py                 # llama-134m, 4 x 512 packed rows, steps 2-3 profiled
    python bench/profile_step.py --extra --lora_dropout 0.0

Runs ``finetune_clm`` in this process with the benchmark's command line (``bench/worker.py``)
and profiles steps ``--skip`` + 1 to ``--skip`` + ``--steps`` (the first steps allocate and pick
kernels). Prints the operators by self CPU time, and the step time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmtune.finetuning  # noqa: E402,F401  OpenMP settings first, as the CLI does
import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

from bench.assets import build_model_dir, write_records  # noqa: E402
from bench.worker import lmtune_argv  # noqa: E402


def profiled_training_step(skip: int, steps: int, found: dict):
    original = Trainer.training_step
    state = {"index": 0, "profiler": None, "times": []}

    def step(self, model, inputs, *args, **kwargs):
        state["index"] += 1
        if state["index"] == skip + 1:
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["profiler"].__enter__()
        start = time.perf_counter()
        out = original(self, model, inputs, *args, **kwargs)
        state["times"].append(time.perf_counter() - start)
        if state["index"] == skip + steps:
            state["profiler"].__exit__(None, None, None)
            found["table"] = state["profiler"].key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            found["shape"] = tuple(inputs["input_ids"].shape)
        found["times"] = state["times"]
        return out

    Trainer.training_step = step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-134m")
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--skip", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16", default="True")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More lmtune flags.")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lmtune-profile-"))
    model_dir = build_model_dir(args.model, Path.home() / ".cache" / "lmtune-bench")
    train_file, _ = write_records(args.records, work)
    spec = dict(model_dir=str(model_dir), train_file=str(train_file), max_seq_length=args.max_seq_length,
                batch_size=4, bf16=args.bf16, concatenation=True, output_dir=str(work / "out"), extra=args.extra)
    argv = lmtune_argv(spec) + ["--max_steps", str(args.skip + args.steps)]
    found: dict = {}
    profiled_training_step(args.skip, args.steps, found)
    from lmtune.cli import main_clm

    if main_clm(argv) != 0:
        return 1
    print(f"steps (s): {', '.join(f'{t:.2f}' for t in found['times'])}; batch {found['shape']}; "
          f"profiled steps {args.skip + 1}-{args.skip + args.steps}")
    print(found["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
