"""The curves of a run: train and eval loss, and the task metrics of each evaluation, as PNGs.

Contract: ``loss_points`` and ``metric_points`` read the Trainer's ``log_history`` (the list in
``trainer_state.json``); ``plot_loss_curve`` draws the losses into ``output_dir/loss_curve.png``
and ``plot_metric_curves`` the task metrics of evaluations during training (ROUGE, pass@1,
TruthfulQA) into its companion ``output_dir/metrics_curve.png``, both with matplotlib's
file-only Agg backend (no display needed). matplotlib is an optional extra
(``pip install lmtune[plots]``): without it the plots are skipped with one warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"
METRICS_CURVE_FILE = "metrics_curve.png"
# Evaluation keys that are not a task metric: losses (drawn with the loss), timings and counts.
_NOT_METRICS = ("eval_loss", "eval_ppl", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                "eval_metric_samples", "eval_model_preparation_time")


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


def metric_points(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"eval_rouge1": [(step, value), ...], ...}``: every task metric of the evaluations during training."""
    points: dict[str, dict[int, float]] = {}
    for entry in log_history:
        if "eval_loss" not in entry or "step" not in entry:
            continue
        for key, value in entry.items():
            if key.startswith("eval_") and key not in _NOT_METRICS and isinstance(value, (int, float)):
                points.setdefault(key, {})[int(entry["step"])] = float(value)
    return {key: sorted(values.items()) for key, values in points.items()}


def new_figure(size: tuple[float, float] = (7, 4.2)):
    """A bare Figure on the Agg canvas (file output, no display, no pyplot global state), or None
    without matplotlib (warned once per call site)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was drawn; pip install lmtune[plots] for it.")
        return None
    figure = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(figure)
    return figure


def style_step_axes(axes, ylabel: str, title: str) -> None:
    """Whole-number optimizer steps on x, a light grid, the legend."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)


def plot_metric_curves(
    log_history: list[dict[str, Any]], output_dir: str | Path, *, title: str = "task metrics"
) -> Path | None:
    """Draw every task metric of the evaluations during training into ``output_dir/metrics_curve.png``.

    ROUGE (0-100) and rates (0-1) get separate panels, so neither flattens the other.

    Returns:
        The PNG path, or None when matplotlib is missing or no task metric was logged.
    """
    points = metric_points(log_history)
    if not points:
        return None
    groups = [[k for k in points if max(v for _, v in points[k]) > 1.0], [k for k in points
                                                                           if max(v for _, v in points[k]) <= 1.0]]
    groups = [group for group in groups if group]
    figure = new_figure((7, 3.2 * len(groups)))
    if figure is None:
        return None
    for axes, keys in zip(figure.subplots(len(groups), 1, squeeze=False)[:, 0], groups):
        for key in keys:
            steps, values = zip(*points[key])
            axes.plot(steps, values, label=key, marker="o" if len(steps) <= 30 else None, markersize=4)
        style_step_axes(axes, "score", title)
    figure.tight_layout()
    path = Path(output_dir) / METRICS_CURVE_FILE
    figure.savefig(path)
    return path


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
    figure = new_figure()
    if figure is None:
        return None
    axes = figure.subplots()
    for split, style in (("train", {"color": "tab:blue"}), ("eval", {"color": "tab:orange", "linestyle": "--"})):
        if points[split]:
            steps, losses = zip(*points[split])
            marker = "o" if len(steps) <= 30 else None
            axes.plot(steps, losses, label=f"{split} loss", marker=marker, markersize=4, **style)
    style_step_axes(axes, "loss", title)
    figure.tight_layout()
    path = Path(output_dir) / LOSS_CURVE_FILE
    figure.savefig(path)
    return path


__all__ = ["LOSS_CURVE_FILE", "METRICS_CURVE_FILE", "load_log_history", "loss_points", "metric_points",
           "new_figure", "plot_loss_curve", "plot_metric_curves", "style_step_axes"]
