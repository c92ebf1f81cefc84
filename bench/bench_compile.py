"""torch.compile for LoRA training on CPU: compile time against the steady-state gain.

    python bench/bench_compile.py [--model llama-134m] [--steps 6]

Builds the benchmark model with LoRA (r=8 on q_proj/v_proj, dropout 0.05), as lmtune trains
it, and times forward + backward + AdamW steps on 4 x ``--seq`` random tokens: eager, then
``torch.compile(model)`` (inductor, the default). Prints the first compiled step (the compile),
the median step of each, and how many steps a run needs before compiling pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.assets import build_model_dir


def steps(model, batch, count: int, bf16: bool) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-small")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen weights in bf16 (lmtune --bf16).")
    args = parser.parse_args(argv)
    model_dir = build_model_dir(args.model, Path.home() / ".cache" / "lmtune-bench")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ids = torch.randint(3, 32000, (4, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model.train()
        if mode == "compiled":
            model = torch.compile(model)
        results[mode] = steps(model, batch, args.steps, args.bf16)
        print(mode, " ".join(f"{t:.2f}" for t in results[mode]), flush=True)
    eager = statistics.median(results["eager"][1:])
    compiled = statistics.median(results["compiled"][1:])
    first = results["compiled"][0] - compiled
    gain = eager - compiled
    pays = f"after {first / gain:.0f} steps" if gain > 0 else "never (compiled steps are not faster)"
    print(f"{args.model}, 4 x {args.seq}, {'bf16 autocast' if args.bf16 else 'fp32'}: eager step {eager:.2f} s, "
          f"compiled step {compiled:.2f} s ({eager / compiled:.2f}x), compile {first:.1f} s; compiling pays {pays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
