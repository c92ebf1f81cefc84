"""Quiet by default: library noise stays out of a run at the reference's --log_level info, and comes
back with --log_level debug."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from lmtune.process_state import preserved_process_state
from lmtune.train.progress import LIBRARY_NOTICES, configure_messages

from conftest import PROJECT_ROOT

NOISE = {
    "config printed": "Model config LlamaConfig {",
    "share your model": "Do not forget to share your model",
}


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("verbose", [False, True])
def test_library_notices_are_dropped_unless_verbose(verbose):
    kept = Kept()
    with preserved_process_state():
        for name in LIBRARY_NOTICES:  # as in a fresh process: earlier command-line runs in this one added filters
            logging.getLogger(name).filters.clear()
        configure_messages(interactive=True, verbose=verbose)
        for name, prefixes in LIBRARY_NOTICES.items():
            logging.getLogger(name).addHandler(kept)  # transformers' loggers do not propagate to the root
            logging.getLogger(name).warning("%s (test)", prefixes[0])
            logging.getLogger(name).removeHandler(kept)
    assert len(kept.messages) == (len(LIBRARY_NOTICES) if verbose else 0)
    assert "Token indices sequence length is longer than" in str(LIBRARY_NOTICES)
    assert "Setting accelerator to CPU" in str(LIBRARY_NOTICES)


def run_cli(tiny_llama_dir, data, out, log_level: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(data), "--output_dir", str(out),
            "--do_train", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--log_level", log_level]
    result = subprocess.run([sys.executable, "-m", "lmtune.finetune_clm", *argv], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_info_run_is_quiet_and_debug_shows_everything(tiny_llama_dir, alpaca_file, tmp_path):
    info = run_cli(tiny_llama_dir, alpaca_file, tmp_path / "info", "info")
    debug = run_cli(tiny_llama_dir, alpaca_file, tmp_path / "debug", "debug")
    assert {name for name, text in NOISE.items() if text in info} == set()
    assert {name for name, text in NOISE.items() if text in debug} == set(NOISE)
    assert "[real_accelerator.py" not in info
    assert "INFO lmtune: adapter lora:" in info  # lmtune's own info lines stay


@pytest.mark.slow
def test_chat_without_a_terminal_prints_no_library_bars(tiny_llama_dir):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "lmtune", "chat", "--model_name_or_path", str(tiny_llama_dir),
                             "--prompt", "Hi", "--max_new_tokens", "2"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr and "[real_accelerator.py" not in result.stdout + result.stderr
