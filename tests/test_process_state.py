"""The Python API leaves the caller's process as it found it; importing lmtune sets nothing."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings

import datasets
import transformers

from lmtune.finetuning import finetune

from conftest import PROJECT_ROOT


def process_state(handler: logging.Handler) -> dict:
    root = logging.getLogger()
    return {
        "root handlers": root.handlers[:], "root level": root.level, "handler filters": handler.filters[:],
        "lmtune level": logging.getLogger("lmtune").level,
        "transformers level": logging.getLogger("transformers").level,
        "library filters": {name: logging.getLogger(name).filters[:] for name in ("transformers", "datasets")},
        "warning filters": warnings.filters[:],
        "progress bars": (transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()),
        "environment": dict(os.environ),
    }


def test_two_api_calls_leave_logging_warnings_and_environment_unchanged(tiny_llama_dir, alpaca_file, tmp_path):
    handler = logging.StreamHandler(io.StringIO())  # the caller's own console handler
    logging.getLogger().addHandler(handler)
    try:
        before = process_state(handler)
        for run in ("first", "second"):
            finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file),
                     output_dir=str(tmp_path / run), do_train=True, max_steps=1, report_to="none",
                     save_strategy="no", log_level="info")
            after = process_state(handler)
            assert {key: value for key, value in after.items() if value != before[key]} == {}, run
    finally:
        logging.getLogger().removeHandler(handler)


def test_importing_lmtune_sets_no_environment_variable():
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    code = "import os, lmtune.finetuning, lmtune.cli; print(os.environ.get('OMP_WAIT_POLICY'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
