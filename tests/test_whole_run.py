"""After a resume, train_loss is the loss of the whole run, as an uninterrupted run reports it."""

from __future__ import annotations

import logging
import shutil

import pytest

from lmtune.finetuning import finetune
from lmtune.train.whole_run import whole_run_train_loss

from conftest import write_jsonl


def test_whole_run_loss_from_the_log_history():
    history = [{"loss": 4.0, "step": 1}, {"loss": 3.0, "step": 2}, {"loss": 2.0, "step": 3}, {"loss": 1.0, "step": 4},
               {"eval_loss": 9.0, "step": 4}]
    assert whole_run_train_loss(history, 2, 4, resumed_loss=1.5) == pytest.approx(2.5)
    # Logged every 2 steps: the checkpoint at step 2 is on a log, so steps 1-2 are known.
    assert whole_run_train_loss([{"loss": 3.5, "step": 2}], 2, 4, resumed_loss=1.5) == pytest.approx(2.5)
    # Not resumed: the Trainer's own figure.
    assert whole_run_train_loss(history, 0, 4, resumed_loss=2.5) == pytest.approx(2.5)


@pytest.mark.slow
def test_resumed_run_reports_the_loss_of_the_whole_run(tiny_llama_dir, demo_records, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", demo_records[:16])
    flags = dict(model_name_or_path=str(tiny_llama_dir), train_file=str(data), do_train=True, max_steps=4,
                 per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, save_strategy="steps",
                 save_steps=2, report_to="none", disable_tqdm=True)
    whole = finetune(output_dir=str(tmp_path / "whole"), **flags)
    # The same run, stopped after its step-2 checkpoint: what a crash leaves behind.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    for name in ("train_results.json", "all_results.json", "trainer_state.json"):
        (tmp_path / "resumed" / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        resumed = finetune(output_dir=str(tmp_path / "resumed"), **flags)
    assert any(r.getMessage().startswith("resuming from ") and "checkpoint-2 (step 2" in r.getMessage()
               for r in caplog.records)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
