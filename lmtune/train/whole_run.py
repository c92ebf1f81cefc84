"""The training loss of a whole run, also when it was resumed from a checkpoint.

After a resume, the Trainer's ``train_loss`` averages only the steps of the resumed call. The
steps before it are in the log history the checkpoint carried (each logged ``loss`` is the mean
over the steps since the previous log), so the whole run's mean is rebuilt from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.train.checkpointing import checkpoint_step


def whole_run_train_loss(log_history: list[dict[str, Any]], resumed_at: int, final_step: int,
                         resumed_loss: float) -> float:
    """Mean loss per optimizer step over the whole run.

    Args:
        log_history: ``trainer.state.log_history`` after training (it starts with the checkpoint's).
        resumed_at: The step of the checkpoint the run resumed from (0: not resumed).
        final_step: The last step.
        resumed_loss: The Trainer's ``train_loss``: the mean over steps ``resumed_at + 1 .. final_step``.

    Returns:
        The mean over every step whose loss is known: steps before the checkpoint's last logged
        step and after it are known; steps between that log and the checkpoint were never logged
        (they count only when ``--logging_steps`` divides the checkpoint step).
    """
    known_sum, known_steps, last = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and last < step <= resumed_at:
            known_sum += entry["loss"] * (step - last)
            known_steps += step - last
            last = step
    resumed_steps = final_step - resumed_at
    return (known_sum + resumed_loss * resumed_steps) / max(known_steps + resumed_steps, 1)


def final_train_metrics(metrics: dict[str, Any], log_history: list[dict[str, Any]], global_step: int, *,
                        resumed_from: str | None, samples: int, rows: int | None) -> dict[str, Any]:
    """The Trainer's training metrics with the loss of the whole run (also after a resume), and
    samples told apart from the packed rows that hold them (``rows``: None when not packed)."""
    metrics = dict(metrics, train_samples=samples)
    if rows is not None:
        metrics["train_rows"] = rows
    resumed_at = checkpoint_step(Path(resumed_from)) if resumed_from else None
    if resumed_at:
        metrics["train_loss"] = whole_run_train_loss(log_history, resumed_at, global_step, metrics["train_loss"])
    return metrics
