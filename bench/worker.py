"""One benchmark run, in its own process: ``python bench/worker.py SPEC.json RESULT.json``.

The parent times this whole process (imports and data preparation included) and reads its
peak RSS; this side records when each training step starts, so the parent can compute
steady-state FLOP/s, and what each run trained on. The same step timer wraps the stock
``Trainer.training_step`` for the reference and for lmtune (whose Trainer subclasses it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: lmtune and bench/

_RUN: dict = {"steps": [], "process_start": time.perf_counter()}


def install_step_timer() -> None:
    """Record (start time, batch, sequence length) of every training step, and when training ends."""
    from transformers import Trainer

    training_step, train = Trainer.training_step, Trainer.train

    def timed_step(self, model, inputs, *args, **kwargs):
        _RUN["trainer"] = self
        _RUN["steps"].append((time.perf_counter(), *inputs["input_ids"].shape))
        return training_step(self, model, inputs, *args, **kwargs)

    def timed_train(self, *args, **kwargs):
        _RUN["train_start"] = time.perf_counter()
        result = train(self, *args, **kwargs)
        _RUN["train_end"] = time.perf_counter()
        return result

    Trainer.training_step, Trainer.train = timed_step, timed_train


def lmtune_argv(spec: dict) -> list[str]:
    """The reference's own command line (``finetune_clm.py``'s flags), as a user would pass it to lmtune."""
    argv = [
        "--model_name_or_path", spec["model_dir"], "--train_file", spec["train_file"],
        "--bf16", str(spec["bf16"]), "--per_device_train_batch_size", str(spec["batch_size"]),
        "--gradient_accumulation_steps", "1", "--do_train", "--learning_rate", "1e-4",
        "--num_train_epochs", "1", "--max_seq_length", str(spec["max_seq_length"]),
        "--logging_steps", "1", "--save_strategy", "no", "--log_level", "info", "--seed", "42",
        "--output_dir", spec["output_dir"], "--overwrite_output_dir", "--peft", "lora", "--no_cuda",
        "--report_to", "none", "--disable_tqdm", "True",
    ]
    if spec["concatenation"]:
        argv.append("--dataset_concatenation")
    return argv + spec.get("extra", [])


def run_lmtune(spec: dict) -> dict:
    from lmtune.cli import main_clm

    code = main_clm(lmtune_argv(spec))
    if code != 0:
        raise SystemExit(f"lmtune exited with {code}")
    state = json.loads((Path(spec["output_dir"]) / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    results = json.loads((Path(spec["output_dir"]) / "train_results.json").read_text(encoding="utf-8"))
    return {"train_loss": results["train_loss"], "final_loss": losses[-1], "steps": state["global_step"]}


def run_reference_variant(spec: dict) -> dict:
    from bench.reference_path import run_reference

    return run_reference(
        model_dir=spec["model_dir"], train_file=spec["train_file"], output_dir=spec["output_dir"],
        max_seq_length=spec["max_seq_length"], batch_size=spec["batch_size"],
        concatenation=spec["concatenation"], bf16=spec["bf16"],
    )


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec["kind"] == "lmtune":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the lmtune commands do
    install_step_timer()
    outcome = run_lmtune(spec) if spec["kind"] == "lmtune" else run_reference_variant(spec)
    trainer = _RUN["trainer"]
    dataset = trainer.train_dataset
    outcome.update(
        dataset_tokens=sum(len(ids) for ids in dataset["input_ids"]),
        rows=len(dataset),
        compute="bf16" if trainer.args.bf16 else "fp32",
        weights=str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
        steps_timed=_RUN["steps"],
        train_start=_RUN["train_start"],
        setup_s=_RUN["train_start"] - _RUN["process_start"],
        train_s=_RUN["train_end"] - _RUN["train_start"],
        train_end=_RUN["train_end"],
        threads=__import__("torch").get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
    )
    Path(result_path).write_text(json.dumps(outcome), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
