"""Start-up phases: timed from the process's own start, logged at --log_level debug after the first step."""

from __future__ import annotations

import logging
import re
import time

from lmtune.cli import main_clm
from lmtune.train import startup
from lmtune.train.startup import StartupPhases, process_start_time


def test_process_start_is_before_now_and_falls_back_to_the_import_time(tmp_path):
    started = process_start_time()
    assert started <= time.time()
    assert started <= startup._IMPORTED + 1.0  # the process began before this module loaded (clock ticks: 10 ms)
    assert process_start_time(str(tmp_path / "missing")) == startup._IMPORTED


def test_phases_are_consecutive_and_add_up_to_the_time_since_start():
    phases = StartupPhases(start=time.time() - 2.0)
    phases.mark("imports")
    time.sleep(0.05)
    phases.mark("data")
    (first, imports), (second, data) = phases.phases
    assert (first, second) == ("imports", "data")
    assert imports >= 2.0 and data >= 0.05
    assert phases.summary("done").startswith(f"start-up: imports {imports:.2f} s, data {data:.2f} s; done at ")


def test_debug_log_level_prints_every_phase_once_after_the_first_step(tiny_llama_dir, alpaca_file, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="lmtune"):
        code = main_clm(["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file),
                         "--output_dir", str(tmp_path / "out"), "--do_train", "--max_steps", "2",
                         "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                         "--disable_tqdm", "True", "--no_cuda", "--dataset_concatenation", "--log_level", "debug"])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up: ")]
    assert len(lines) == 1
    names = re.findall(r"(?:start-up: |, )([a-z0-9 +-]+?) \d+\.\d\d s", lines[0])
    assert names == ["imports and argument parsing", "argument checks", "bf16 probe", "tokenizer and data",
                     "model load + packing probe + adapter", "training set-up", "first step"]
    assert "first optimizer step done at " in lines[0]
