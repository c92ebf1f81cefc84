"""With DDP, the task metric of each evaluation is computed once over the whole subset: the items are
split across the processes and the parts gathered, so two processes log what one process logs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from lmtune.cli import main, main_clm

REPO_ROOT = Path(__file__).resolve().parents[1]
# Answers of one shape, so a random model's preferences vary from question to question.
QUESTIONS = [
    {"question": f"What colour is the {thing}?",
     "mc1_targets": {f"The {thing} is {a}.": 1, f"The {thing} is {b}.": 0, f"The {thing} is {c}.": 0},
     "mc2_targets": {f"The {thing} is {a}.": 1, f"It is {a}.": 1, f"The {thing} is {b}.": 0, f"It is {c}.": 0}}
    for thing, a, b, c in (("cat", "black", "green", "red"), ("door", "red", "blue", "white"),
                           ("park", "green", "grey", "pink"), ("bird", "blue", "black", "green"),
                           ("answer", "white", "red", "blue"))
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags(model: Path, train: Path, validation: Path, questions: Path, out: Path, *, batch: int) -> list[str]:
    """Two SGD steps in file order (as tests/test_ddp.py), TruthfulQA MC1/MC2 at each step on all 5 questions."""
    return [
        "--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(validation),
        "--output_dir", str(out), "--do_train", "--max_steps", "2", "--per_device_train_batch_size", str(batch),
        "--optim", "sgd", "--learning_rate", "0.5", "--lora_dropout", "0", "--train_sampling_strategy", "sequential",
        "--max_seq_length", "256", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
        "--logging_steps", "1", "--seed", "0", "--no_cuda", "--eval_strategy", "steps", "--eval_steps", "1",
        "--truthfulqa_file", str(questions), "--eval_metric_samples", "5", "--eval_generation_batch_size", "2",
    ]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [{k: e[k] for k in ("step", "eval_truthfulqa_mc1", "eval_truthfulqa_mc2", "eval_metric_samples")}
            for e in history if "eval_loss" in e]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_log_the_metric_of_one(tiny_llama_dir, demo_records, tmp_path, monkeypatch):
    train, validation, questions = tmp_path / "train.json", tmp_path / "validation.json", tmp_path / "mc_task.json"
    train.write_text(json.dumps(demo_records[:16]))
    validation.write_text(json.dumps(demo_records[16:20]))
    questions.write_text(json.dumps(QUESTIONS))
    single = tmp_path / "single"
    assert main_clm(flags(tiny_llama_dir, train, validation, questions, single, batch=8)) == 0
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    double = tmp_path / "double"
    assert main(["launch", "--world_size", "2", "--master_port", str(free_port()), "finetune_clm",
                 *flags(tiny_llama_dir, train, validation, questions, double, batch=4)]) == 0
    one, two = metrics(single), metrics(double)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["eval_metric_samples"] == 5
        # The metric of all 5 questions; one process's share (3 or 2 of them) would differ.
        assert b["eval_truthfulqa_mc1"] == pytest.approx(a["eval_truthfulqa_mc1"], abs=1e-6)
        assert b["eval_truthfulqa_mc2"] == pytest.approx(a["eval_truthfulqa_mc2"], rel=1e-4)
    # Some questions right, some wrong (1 of 5): a share of 3 or 2 questions cannot have the same MC1.
    assert 0 < one[0]["eval_truthfulqa_mc1"] < 1 and 0 < one[0]["eval_truthfulqa_mc2"] < 1
