"""The loss curve of a run: train and eval loss against optimizer steps, as a PNG.

Contract: ``loss_points`` reads the Trainer's ``log_history`` (the list in
``trainer_state.json``); ``plot_loss_curve`` draws it with matplotlib's file-only Agg
backend (no display needed) into ``output_dir/loss_curve.png``. matplotlib is an optional
extra (``pip install lmtune[plots]``): without it the plot is skipped with one warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"


def load_log_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The ``log_history`` of ``output_dir/trainer_state.json``, or [] when there is none."""
    state_file = Path(output_dir) / "trainer_state.json"
    if not state_file.is_file():
        return []
    return json.loads(state_file.read_text(encoding="utf-8")).get("log_history", [])


def loss_points(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss), ...], "eval": [...]}`` from a Trainer log history.

    The end-of-training summary (``train_loss``, an average over the run) is not a point
    on the curve and is left out; an evaluation logged twice at one step counts once.
    """
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = {int(e["step"]): float(e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e}
    return {"train": train, "eval": sorted(evals.items())}


def plot_loss_curve(
    log_history: list[dict[str, Any]], output_dir: str | Path, *, title: str = "loss"
) -> Path | None:
    """Draw train and eval loss against step into ``output_dir/loss_curve.png``.

    Args:
        log_history: ``trainer.state.log_history`` (or ``load_log_history(output_dir)``).
        output_dir: Where the PNG goes.
        title: Plot title, e.g. the base model and data.

    Returns:
        The PNG path, or None when matplotlib is missing or no loss was logged.
    """
    points = loss_points(log_history)
    if not points["train"] and not points["eval"]:
        logger.warning("no loss was logged (fewer steps than --logging_steps?), so there is no loss curve; "
                       "lower --logging_steps to get one.")
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("matplotlib is not installed, so no %s was drawn; pip install lmtune[plots] for it.",
                       LOSS_CURVE_FILE)
        return None
    # A bare Figure on the Agg canvas: file output with no display and no pyplot global state.
    figure = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for split, style in (("train", {"color": "tab:blue"}), ("eval", {"color": "tab:orange", "linestyle": "--"})):
        if points[split]:
            steps, losses = zip(*points[split])
            marker = "o" if len(steps) <= 30 else None
            axes.plot(steps, losses, label=f"{split} loss", marker=marker, markersize=4, **style)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(output_dir) / LOSS_CURVE_FILE
    figure.savefig(path)
    return path


__all__ = ["LOSS_CURVE_FILE", "load_log_history", "loss_points", "plot_loss_curve"]
