"""Killed, stopped or interrupted runs resume to exactly the adapter an uninterrupted run ends with.

Every interrupted run is a real ``python -m lmtune.finetune_clm`` process; the uninterrupted
reference runs in-process with the same command line (one thread in both, so the float sums
are done in the same order). Exact means ``torch.equal`` on every adapter tensor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.finetuning import parse_for_model, run_finetune
from lmtune.train.checkpointing import COMPLETE_MARKER

from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

COMMON = ["--do_train", "--max_steps", "10", "--save_steps", "2", "--learning_rate", "1e-2", "--lora_dropout", "0.1",
          "--max_seq_length", "256", "--seed", "7", "--logging_steps", "1", "--report_to", "none",
          "--disable_tqdm", "True", "--use_cpu", "True"]
PACKED = COMMON + ["--dataset_concatenation", "--per_device_train_batch_size", "2"]
# 40 records, 4 a step: the resumed part crosses an epoch boundary, where the sampler draws a new order.
GROUPED = COMMON + ["--group_by_length", "--per_device_train_batch_size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
# Kills its own process in the middle of writing checkpoint-4: the adapter and optimizer are
# written, the RNG state and trainer state are not.
KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
original = Trainer._save_rng_state
def save_rng_state_then_die(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, output_dir)
Trainer._save_rng_state = save_rng_state_then_die
from lmtune.cli import main_clm
sys.exit(main_clm(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, demo_records) -> Path:
    import json

    path = tmp_path_factory.mktemp("resume-data") / "train.json"
    path.write_text(json.dumps(demo_records[:40]), encoding="utf-8")
    return path


def argv(model: Path, data: Path, out: Path, flags: list[str]) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out), *flags]


def launch(args: list[str], log: Path, program: list[str] | None = None) -> subprocess.Popen:
    program = program or ["-m", "lmtune.finetune_clm"]
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, *program, *args], stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                cwd=log.parent)


def run(args: list[str], log: Path) -> str:
    process = launch(args, log)
    assert process.wait(timeout=900) == 0, log.read_text()
    return log.read_text()


def wait_for_checkpoint(out: Path, step: int, process: subprocess.Popen, log: Path) -> None:
    marker = out / f"checkpoint-{step}" / COMPLETE_MARKER
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert process.poll() is None, f"training ended before checkpoint-{step}:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def reference_adapter(args: list[str]) -> dict[str, torch.Tensor]:
    """The uninterrupted run, in this process, on one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_finetune(parse_for_model(args))
    finally:
        torch.set_num_threads(threads)
    return adapter(Path(args[args.index("--output_dir") + 1]))


def assert_same_adapter(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    differences = {k: (resumed[k] - reference[k]).abs().max().item() for k in reference}
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), differences


@pytest.fixture(scope="module")
def packed_reference(tiny_llama_dir, data_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("packed-reference") / "out"
    return reference_adapter(argv(tiny_llama_dir, data_file, out, PACKED))


def resumed_output(out: Path, args: list[str], log: Path) -> tuple[str, int]:
    """Re-run the same command; return its log and the step it said it resumed from."""
    text = run(args, log)
    found = re.search(r"resuming from (\S+)/checkpoint-(\d+) \(step (\d+) of 10\)", text)
    assert found, text
    assert found.group(1) == str(out) and found.group(2) == found.group(3)
    return text, int(found.group(2))


def test_sigkill_then_same_command_resumes_exactly(tiny_llama_dir, data_file, tmp_path, packed_reference):
    out = tmp_path / "out"
    args = argv(tiny_llama_dir, data_file, out, PACKED)
    process = launch(args, tmp_path / "killed.log")
    wait_for_checkpoint(out, 2, process, tmp_path / "killed.log")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "train_results.json").exists()
    at_kill = adapter(out / "checkpoint-2")
    _, step = resumed_output(out, args, tmp_path / "resumed.log")
    assert step >= 2
    assert_same_adapter(adapter(out), packed_reference)
    assert not all(torch.equal(at_kill[k], packed_reference[k]) for k in at_kill)  # training moved it


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tiny_llama_dir, data_file, tmp_path,
                                                                 packed_reference):
    out = tmp_path / "out"
    args = argv(tiny_llama_dir, data_file, out, PACKED)
    process = launch(args, tmp_path / "killed.log", ["-c", KILL_DURING_SAVE])
    assert process.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    staged = out / ".staging-checkpoint-4" / "checkpoint-4"
    assert (staged / "adapter_model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    assert not (out / "checkpoint-4").exists()
    kept = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {COMPLETE_MARKER, "adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= kept
    text, step = resumed_output(out, args, tmp_path / "resumed.log")
    assert step == 2
    assert f"removed {out / '.staging-checkpoint-4'}, left by a checkpoint save that was interrupted" in text
    assert_same_adapter(adapter(out), packed_reference)


def test_sigterm_saves_at_step_boundary_and_resumes_exactly(tiny_llama_dir, data_file, tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    args = argv(tiny_llama_dir, data_file, out, GROUPED)
    process = launch(args, tmp_path / "stopped.log")
    wait_for_checkpoint(out, 2, process, tmp_path / "stopped.log")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=600) == 130
    text = (tmp_path / "stopped.log").read_text()
    assert "SIGTERM received: finishing the current step, saving a checkpoint, then stopping" in text
    stopped = re.search(r"training stopped by SIGTERM at step (\d+); (\S+) is saved\. Run the same command again "
                        r"to resume from it\.", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert stopped.group(2) == str(out / f"checkpoint-{step}") and (out / f"checkpoint-{step}" / COMPLETE_MARKER).exists()
    assert not (out / "train_results.json").exists()
    _, resumed_from = resumed_output(out, args, tmp_path / "resumed.log")
    assert resumed_from == step
    reference_out = tmp_path_factory.mktemp("grouped-reference") / "out"
    assert_same_adapter(adapter(out), reference_adapter(argv(tiny_llama_dir, data_file, reference_out, GROUPED)))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    # Room for 200 steps, no scheduled saves: the run is mid-training when Ctrl-C comes, and any
    # checkpoint is the one the signal asked for.
    flags = ["--do_train", "--max_steps", "200", "--save_strategy", "no", "--logging_steps", "1", "--max_seq_length",
             "256", "--report_to", "none", "--disable_tqdm", "True", "--use_cpu", "True", "--dataset_concatenation"]
    process = launch(argv(tiny_llama_dir, data_file, out, flags), tmp_path / "int.log")
    wait_for_log(tmp_path / "int.log", re.compile(r"\bloss\b"), process)  # the first step's log line
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=600) == 130
    text = (tmp_path / "int.log").read_text()
    stopped = re.search(r"training stopped by SIGINT at step (\d+); (\S+) is saved", text)
    assert stopped, text
    saved = out / f"checkpoint-{stopped.group(1)}"
    assert stopped.group(2) == str(saved) and (saved / COMPLETE_MARKER).is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == [saved.name]  # --save_strategy no: only the signal's save
    assert "lmtune: interrupted." in text and "Traceback" not in text


def wait_for_log(log: Path, pattern: re.Pattern, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 900
    while not pattern.search(log.read_text()):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
