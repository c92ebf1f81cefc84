"""``lmtune compare RUN_DIR ...``: several finished runs side by side, from the files they wrote.

Contract: each run directory is read, never written: ``lmtune_args.json`` (the flags that tell
runs apart: model, method, rank, learning rate, steps, data), ``all_results.json`` (final
metrics, wall time) and ``trainer_state.json`` (steps done, tokens seen, the best checkpoint, and
the loss and metrics of every logged step). ``compare_runs`` returns one ``RunSummary`` per run;
``render_report`` makes a Markdown report of two tables (the runs' settings and final metrics;
the best value of each metric during training, with its step); ``plot_runs`` draws every run's
loss and task-metric curves into one PNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError
from lmtune.export.plots import loss_points, metric_points, new_figure, style_step_axes
from lmtune.run_record import ARGS_FILE

REPORT_TITLE = "# lmtune compare"
# Final metrics that are bookkeeping, not results.
_NOT_RESULTS = ("epoch", "total_flos", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
                "eval_samples_per_second", "eval_steps_per_second", "train_runtime", "num_input_tokens_seen")


@dataclass
class RunSummary:
    """What the report shows of one run, every value as the run's files hold it."""

    name: str
    settings: dict[str, Any]
    final: dict[str, float]
    best: dict[str, tuple[float, int]]
    log_history: list[dict[str, Any]] = field(repr=False, default_factory=list)


def _read(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path.parent}: no {path.name}; lmtune compare reads finished lmtune runs "
                              "(their --output_dir).")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); was the run killed while writing it?") from err


def _settings(args: dict[str, Any], state: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    model, data = args.get("model", {}), args.get("data", {})
    ft, training = args.get("finetune", {}), args.get("training", {})
    runtime = results.get("train_runtime")
    tokens = state.get("num_input_tokens_seen") or results.get("num_input_tokens_seen")
    steps, max_steps = state.get("global_step"), state.get("max_steps")
    return {
        "model": Path(str(model.get("model_name_or_path"))).name,
        "method": "full" if ft.get("full_finetune") else ft.get("peft"),
        "rank": None if ft.get("full_finetune") or ft.get("peft") != "lora" else ft.get("lora_rank"),
        "lr": training.get("learning_rate"),
        "steps": f"{steps}/{max_steps}" if steps is not None and steps != max_steps else steps,
        "data": Path(str(data.get("train_file") or data.get("dataset_name"))).name,
        "wall time (s)": runtime,
        "tokens/s": tokens / runtime if tokens and runtime else None,
    }


def _best(state: dict[str, Any], metric: str | None) -> dict[str, tuple[float, int]]:
    """The best value and its step of every evaluated metric (lowest loss/ppl, highest score)."""
    best = {}
    points = metric_points(state.get("log_history", []))
    points["eval_loss"] = loss_points(state.get("log_history", []))["eval"]
    for key, values in points.items():
        if values:
            pick = min if key.endswith(("loss", "ppl")) else max
            value = pick(v for _, v in values)
            best[key] = (value, next(step for step, v in values if v == value))
    if metric and state.get("best_metric") is not None:  # the Trainer's own choice wins for its metric
        best[metric if metric.startswith("eval_") else f"eval_{metric}"] = (state["best_metric"],
                                                                           state.get("best_global_step"))
    return best


def summarize_run(run_dir: str | Path) -> RunSummary:
    """One run's settings, final metrics and best metrics, from its own files.

    Raises:
        ConfigError: when the directory holds no lmtune run or a file is not JSON.
    """
    path = Path(run_dir)
    run = _read(path / ARGS_FILE, required=True)
    state, results = _read(path / "trainer_state.json"), _read(path / "all_results.json")
    args = run.get("args", {})
    final = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in _NOT_RESULTS and not k.endswith("_samples")}
    metric = args.get("training", {}).get("metric_for_best_model")
    return RunSummary(path.name, _settings(args, state, results), final, _best(state, metric),
                      state.get("log_history", []))


def compare_runs(run_dirs: list[str | Path]) -> list[RunSummary]:
    """``summarize_run`` of each directory, in the order given.

    Raises:
        ConfigError: for no directory, or one that is not an lmtune run.
    """
    if not run_dirs:
        raise ConfigError("lmtune compare needs at least one run directory (the --output_dir of a run).")
    return [summarize_run(run_dir) for run_dir in run_dirs]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def render_report(runs: list[RunSummary], *, plot_name: str | None = None) -> str:
    """The Markdown report: settings and final metrics, then the best metrics during training."""
    setting_keys = list(runs[0].settings)
    final_keys = sorted({key for run in runs for key in run.final})
    best_keys = sorted({key for run in runs for key in run.best})
    lines = [REPORT_TITLE, "", f"{len(runs)} runs. Final metrics are those of `all_results.json` (after training).",
             ""]
    lines += _table(["run", *setting_keys, *final_keys],
                    [[run.name, *(run.settings[k] for k in setting_keys), *(run.final.get(k) for k in final_keys)]
                     for run in runs])
    if best_keys:
        lines += ["", "## Best during training (value @ step)", ""]
        rows = [[run.name, *(f"{_cell(run.best[k][0])} @ {run.best[k][1]}" if k in run.best else None
                             for k in best_keys)] for run in runs]
        lines += _table(["run", *best_keys], rows)
    if plot_name:
        lines += ["", f"![loss and metric curves]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[RunSummary], path: str | Path) -> Path | None:
    """Every run's train/eval loss (left) and task metrics (right) against step, in one PNG.

    Returns:
        The PNG path, or None without matplotlib.
    """
    figure = new_figure((12, 4.5))
    if figure is None:
        return None
    loss_axes, metric_axes = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        for split, style in (("train", "-"), ("eval", "--")):
            points = loss_points(run.log_history)[split]
            if points:
                loss_axes.plot(*zip(*points), style, color=color, label=f"{run.name} {split}")
        for index, (key, points) in enumerate(metric_points(run.log_history).items()):
            metric_axes.plot(*zip(*points), ["-", "--", ":", "-."][index % 4], color=color, marker="o", markersize=3,
                             label=f"{run.name} {key.removeprefix('eval_')}")
    style_step_axes(loss_axes, "loss", "loss")
    title = "task metrics during training" if metric_axes.lines else "no task metric was logged during training"
    style_step_axes(metric_axes, "score", title)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def write_report(run_dirs: list[str | Path], output: str | Path) -> tuple[Path, Path | None]:
    """Write the report to ``output`` and its curves beside it (same name, ``.png``).

    Raises:
        ConfigError: for a run directory that is not an lmtune run, or an ``output`` that exists and
            is not an earlier ``lmtune compare`` report.
    """
    output = Path(output)
    picture = output.with_suffix(".png")
    ours = output.is_file() and output.read_text(encoding="utf-8", errors="replace").startswith(REPORT_TITLE)
    if output.exists() and not ours:
        raise ConfigError(f"--output {output} exists and is not an lmtune compare report; choose another name.")
    if picture.exists() and not ours:
        raise ConfigError(f"{picture} exists and is not the picture of an lmtune compare report; choose another "
                          "--output name.")
    runs = compare_runs(run_dirs)
    output.parent.mkdir(parents=True, exist_ok=True)
    drawn = plot_runs(runs, picture)
    output.write_text(render_report(runs, plot_name=drawn.name if drawn else None), encoding="utf-8")
    return output, drawn
