"""What a run shows while it trains: a progress bar on a terminal, plain log lines elsewhere.

Contract: ``install_progress(trainer)`` replaces the stock ``ProgressCallback`` /
``PrinterCallback`` (which print raw dicts) with one of ours, chosen once:

- on a terminal, unless ``--disable_tqdm True``: a tqdm bar whose postfix carries loss,
  learning rate and tokens/s (tqdm shows the ETA), with evaluation results written above it;
- otherwise (a pipe, a log file, a batch job): one ``INFO`` log line per ``--logging_steps``
  with step, epoch, loss, learning rate, tokens/s, elapsed time and ETA, and one per evaluation.

Tokens/s counts the input tokens of the training batches, padding excluded (the Trainer's
``include_num_input_tokens_seen="non_padding"`` counter, summed over all processes).
``configure_messages`` keeps a normal run quiet: each warning once, no progress bars from
libraries when nobody watches a terminal, no deprecation warnings the user cannot act on.
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
import warnings
from datetime import timedelta

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

TOKENS_LABEL = "tok/s"
TOKENS_MEANING = "input tokens per second, padding excluded, all processes"
# Deprecations raised inside libraries (not by anything the user wrote): silenced, since
# the user cannot act on them. Each entry: (message regex, category).
LIBRARY_DEPRECATIONS = (
    # peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, deprecated in transformers 5.
    (r".*is_gradient_checkpointing.* is deprecated", FutureWarning),
    # peft 0.21's prefix tuning hands the model past_key_values, renamed `cache` in transformers 5.
    (r"`past_key_values` is deprecated and will be removed", FutureWarning),
    (r"Both `past_key_values` and `cache` are set", FutureWarning),
    (r"Matplotlib is building the font cache", UserWarning),
)
# Library log lines that say nothing to an lmtune user, by logger: lmtune picks the device itself
# (--device), yet with DeepSpeed merely installed, accelerate's probe makes it announce its CPU fallback.
LIBRARY_NOTICES = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    # lmtune tokenizes whole texts and then cuts them to --max_seq_length itself.
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than",),
    # A first matplotlib import (the loss curve) builds its font cache and says so.
    "matplotlib.font_manager": ("generated new fontManager",),
    # bitsandbytes' CPU backend looks for optional kernels at import, also when nothing is quantized.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# Keys of the Trainer's log dicts that the progress display leaves out (TensorBoard keeps them).
_HIDDEN_KEYS = {"epoch", "step", "total_flos", "num_input_tokens_seen"}


def is_interactive(disable_tqdm: bool | None) -> bool:
    """True when a person watches a terminal and did not ask for ``--disable_tqdm``."""
    return not disable_tqdm and sys.stderr.isatty()


class DropFilter(logging.Filter):
    """Drop records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class OnceFilter(logging.Filter):
    """Let each distinct warning (logger + text) through once; other levels pass untouched."""

    def __init__(self) -> None:
        super().__init__("lmtune-once")
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure_messages(*, interactive: bool, verbose: bool = False) -> None:
    """Quiet a normal run: each warning once on the console, library deprecations off, bars only on a terminal.

    Args:
        interactive: A person watches a terminal (``is_interactive``); otherwise the
            weight-loading and dataset progress bars of transformers and datasets are off.
        verbose: ``--log_level debug``: every library message and warning stays visible.
    """
    if not verbose:
        _quiet_libraries()
    if not interactive:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's
        datasets.disable_progress_bars()


def _quiet_libraries() -> None:
    for message, category in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in LIBRARY_NOTICES.items():
        # A logger's own filter; libraries that build their logger later keep it (getLogger returns this one).
        library_logger = logging.getLogger(name)
        if not any(isinstance(f, DropFilter) for f in library_logger.filters):
            library_logger.addFilter(DropFilter(prefixes))
    for handler in logging.getLogger().handlers:
        # Only the console handler of logging.basicConfig (what the CLI sets up): handlers that an
        # application or a test framework installed keep every record they are sent.
        if type(handler) is logging.StreamHandler and not any(isinstance(f, OnceFilter) for f in handler.filters):
            handler.addFilter(OnceFilter())


def check_report_to(report_to: list[str] | str | None) -> None:
    """Fail before any weights load when ``--report_to`` names a backend that is unknown or not installed.

    Raises:
        ConfigError: naming the backend, how to install it, and the installed choices.
    """
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = get_available_reporting_integrations()
    problems = []
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"--report_to {name}: unknown backend{hint}; known: {', '.join(INTEGRATION_TO_CALLBACK)}")
        elif name not in available:
            package = {"comet_ml": "comet-ml", "tensorboard": "tensorboard (or pip install lmtune[tensorboard])",
                       "mlflow": "mlflow", "wandb": "wandb"}.get(name, name)
            problems.append(f"--report_to {name}: its package is not installed; pip install {package}")
    if problems:
        installed = ", ".join(available) or "none"
        raise ConfigError("; ".join(problems) + f". Installed backends: {installed}; --report_to none logs nowhere.")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _number(key: str, value: float) -> str:
    if key in ("learning_rate", "lr"):
        return f"{value:.2e}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


class _Throughput:
    """Tokens per second over the span since the last reading; evaluation time is left out."""

    def __init__(self) -> None:
        self.start = self.mark = time.monotonic()
        self.tokens = 0

    def restart_window(self, tokens_seen: int) -> None:
        self.mark, self.tokens = time.monotonic(), tokens_seen

    def read(self, tokens_seen: int) -> float | None:
        now = time.monotonic()
        rate = (tokens_seen - self.tokens) / (now - self.mark) if now > self.mark and tokens_seen else None
        self.mark, self.tokens = now, tokens_seen
        return rate


def _shown(logs: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in logs.items() if k not in _HIDDEN_KEYS and isinstance(v, (int, float))}


def _summary_line(state: TrainerState, logs: dict[str, float]) -> str:
    """Evaluation results, the end-of-training summary, or any other log, on one line.

    Timing keys (``*_runtime``, ``*_per_second``) shrink to one duration; every metric stays.
    """
    shown = _shown(logs)
    runtime = next((v for k, v in shown.items() if k.endswith("_runtime")), None)
    values = [f"{k} {_number(k, v)}" for k, v in shown.items() if not k.endswith(("_runtime", "_per_second"))]
    took = f" ({_duration(runtime)})" if runtime is not None else ""
    if "train_loss" in shown:
        # A signal (Ctrl-C, SIGTERM) or an early-stopping callback can end training before max_steps.
        done = (f"training done: {state.global_step} steps" if state.global_step >= state.max_steps
                else f"training stopped at step {state.global_step}/{state.max_steps}")
        return f"{done} in {_duration(runtime or 0.0)} · " + " · ".join(values)
    label = "eval" if any(k.startswith("eval_") for k in shown) else "log"
    return f"{label} at step {state.global_step}/{state.max_steps}{took}: " + " · ".join(values)


class LogLinesCallback(TrainerCallback):
    """One log line per logging step and per evaluation, for pipes, files and batch jobs."""

    def __init__(self) -> None:
        self.throughput = _Throughput()
        self.first_step = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.throughput = _Throughput()
        self.throughput.restart_window(state.num_input_tokens_seen)
        self.first_step = state.global_step  # a resumed run starts past 0

    def on_evaluate(self, args, state, control, **kwargs):
        self.throughput.restart_window(state.num_input_tokens_seen)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info("%s", self.format_line(state, logs))

    def format_line(self, state: TrainerState, logs: dict[str, float]) -> str:
        """The text of one log line."""
        if "loss" not in logs:
            return _summary_line(state, logs)
        parts = [f"step {state.global_step}/{state.max_steps} ({state.global_step / max(state.max_steps, 1):.0%})",
                 f"epoch {state.epoch or 0:.2f}"]
        parts += [f"{k} {_number(k, v)}" for k, v in _shown(logs).items() if not k.startswith("train_")]
        rate = self.throughput.read(state.num_input_tokens_seen)
        if rate is not None:
            parts.append(f"{rate:,.0f} {TOKENS_LABEL}")
        elapsed = time.monotonic() - self.throughput.start
        done = state.global_step - self.first_step
        eta = f", ETA {_duration(elapsed / done * (state.max_steps - state.global_step))}" if done > 0 else ""
        parts.append(f"elapsed {_duration(elapsed)}{eta}")
        return " · ".join(parts)


class ProgressBarCallback(ProgressCallback):
    """The stock tqdm bar, with loss, learning rate and tokens/s in its postfix and readable eval lines."""

    def __init__(self) -> None:
        super().__init__()
        self.throughput = _Throughput()

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.throughput.restart_window(state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        self.throughput.restart_window(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.training_bar is None:  # evaluation outside training: no bar to write above
            logger.info("%s", _summary_line(state, logs))
        elif "loss" in logs:
            self.training_bar.set_postfix(self.postfix(state, logs), refresh=True)
        else:
            self.training_bar.write(_summary_line(state, logs))

    def postfix(self, state: TrainerState, logs: dict[str, float]) -> dict[str, str]:
        """Loss, learning rate and tokens/s for the bar; tqdm adds the ETA itself."""
        postfix = {"loss": f"{logs['loss']:.4f}"}
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        rate = self.throughput.read(state.num_input_tokens_seen)
        if rate is not None:
            postfix[TOKENS_LABEL] = f"{rate:,.0f}"
        return postfix


def install_progress(trainer: Trainer) -> TrainerCallback:
    """Swap the Trainer's stock progress display for ours and switch on its token counter.

    The counter (``include_num_input_tokens_seen``) adds one sum per step. A user's own
    choice of ``all`` (padding included) is kept, and the startup line says so.

    Returns:
        The installed callback.
    """
    args = trainer.args
    meaning = TOKENS_MEANING
    if args.include_num_input_tokens_seen in ("no", False, None):
        args.include_num_input_tokens_seen = "non_padding"
    elif args.include_num_input_tokens_seen == "all":
        meaning = meaning.replace("padding excluded", "padding included")
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    callback = ProgressBarCallback() if is_interactive(args.disable_tqdm) else LogLinesCallback()
    trainer.add_callback(callback)
    if trainer.is_world_process_zero():
        shape = "a progress bar" if isinstance(callback, ProgressBarCallback) else "a log line"
        logger.info("progress: %s every %s steps (--logging_steps); %s = %s.",
                    shape, args.logging_steps, TOKENS_LABEL, meaning)
    return callback


__all__ = [
    "LogLinesCallback", "OnceFilter", "ProgressBarCallback", "check_report_to", "configure_messages",
    "install_progress", "is_interactive",
]
