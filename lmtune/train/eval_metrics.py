"""Evaluation while training: the task metric at every evaluation, the best model, early stopping.

Contract:
- ``TaskMetricsCallback`` holds the task's metrics (``evaluate/in_training.py``) and computes them
  when the Trainer evaluates during ``train()``: the Trainer's ``evaluation_loop`` adds them to
  its metrics as ``eval_<key>``, before the Trainer logs them (progress line, TensorBoard,
  ``trainer_state.json``), picks the best checkpoint (``--metric_for_best_model``) and tells the
  callbacks (early stopping). Evaluations outside ``train()`` (after training) are left to
  ``evaluate/after_training.py``, which scores the whole validation set.
- Every evaluation scores the same first ``--eval_metric_samples`` items. Without the flag, the
  first evaluation times one item and takes as many as keep the metric under
  ``EVAL_TIME_SHARE`` of the training time since the previous evaluation, says so, and logs the
  number as ``eval_metric_samples``: a resumed run reads it back from its ``log_history``, so
  its metrics stay comparable with the best one before the interruption.
- With several processes, the items are split across them, each scores its share, and the
  means are gathered and combined: every process holds the same metric of the whole subset,
  so they all take the same best-model and early-stopping decisions.
- ``ResumableEarlyStopping`` is transformers' ``EarlyStoppingCallback`` whose patience counter
  survives a resume (the stock one only comes back with ``--restore_callback_states_from_checkpoint``).
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lmtune.evaluate.in_training import TaskMetric, combine

logger = logging.getLogger(__name__)

EVAL_TIME_SHARE = 0.2
# Items scored when the first evaluation comes before any training (--eval_on_start): no time to budget.
SAMPLES_BEFORE_TRAINING = 8
SAMPLES_KEY = "metric_samples"


def _gather(value, args: TrainingArguments) -> list:
    """``value`` of every process, in rank order (just ``[value]`` in a single process)."""
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


class TaskMetricsCallback(TrainerCallback):
    """The task metrics of each evaluation during training (see the module docstring)."""

    def __init__(self, metrics: list[TaskMetric], *, samples: int | None = None, share: float = EVAL_TIME_SHARE):
        self.metrics = metrics
        self.samples = samples
        self.share = share
        self.training = False
        self._mark = time.monotonic()
        self._trained_steps = 0

    @property
    def keys(self) -> list[str]:
        """The metric names the Trainer logs, ``eval_`` included."""
        return [f"eval_{key}" for metric in self.metrics for key in metric.keys] + [f"eval_{SAMPLES_KEY}"]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.training, self._mark = True, time.monotonic()
        if self.samples is None:  # a resumed run keeps the subset its best metric was measured on
            logged = [entry[f"eval_{SAMPLES_KEY}"] for entry in state.log_history if f"eval_{SAMPLES_KEY}" in entry]
            self.samples = int(logged[-1]) if logged else None

    def on_step_end(self, args, state, control, **kwargs):
        self._trained_steps += 1

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = time.monotonic()  # the next budget counts training time only

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def compute(self, model, tokenizer, args: TrainingArguments) -> dict[str, float]:
        """The metrics (without ``eval_``) of this evaluation; {} outside training or with none to compute."""
        if not self.training or not self.metrics or self.samples == 0:
            return {}
        if self.samples is None:
            self.samples = self._choose_samples(model, tokenizer, args)
        results: dict[str, float] = {}
        for metric in self.metrics:
            shard = metric.items[: self.samples][args.process_index :: args.world_size]
            part = (metric.score(model, tokenizer, shard) if shard else {}, len(shard))
            results.update(combine(_gather(part, args)))
        results[SAMPLES_KEY] = self.samples
        return results

    def _choose_samples(self, model, tokenizer, args: TrainingArguments) -> int:
        """Time one item of each metric on every process; take as many items as fit the time share."""
        available = max(len(metric.items) for metric in self.metrics)
        if not self._trained_steps:  # every process evaluates at the same point, so they agree
            samples = min(available, SAMPLES_BEFORE_TRAINING)
            if args.process_index == 0:
                logger.info("task metrics at each evaluation on the first %d of %d items: the first evaluation "
                            "comes before any training, so there is no training time to size it by; pass "
                            "--eval_metric_samples N to choose.", samples, available)
            return samples
        training_seconds = time.monotonic() - self._mark
        start = time.monotonic()
        for metric in self.metrics:
            probe = metric.items[args.process_index : args.process_index + 1]
            if probe:
                metric.score(model, tokenizer, probe)
        timings = _gather((time.monotonic() - start, training_seconds), args)
        per_item = max(seconds for seconds, _ in timings)
        budget = self.share * timings[0][1]  # the main process's clock decides, for every process alike
        samples = max(1, min(available, int(budget / max(per_item, 1e-9) * args.world_size)))
        if args.process_index == 0:
            logger.info(
                "task metrics at each evaluation: %s on the first %d of %d items (--eval_metric_samples): one "
                "item takes %.1f s, and %d keep an evaluation's metrics under %.0f%% of the %.0f s of training "
                "between evaluations. Pass --eval_metric_samples N to choose (0: eval_loss only).",
                ", ".join(k for k in self.keys if not k.endswith(SAMPLES_KEY)), samples, available, per_item,
                samples, 100 * self.share, timings[0][1],
            )
        return samples


class ResumableEarlyStopping(EarlyStoppingCallback):
    """Stock early stopping that also says why it stopped, and whose patience counter survives a resume."""

    stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):  # the checkpoint's counter (this run's own, 0, when not resuming)
            self.early_stopping_patience_counter = saved.get("attributes", {}).get(
                "early_stopping_patience_counter", self.early_stopping_patience_counter)
        self.stopped_at = None

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and self.stopped_at is None:
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None and state.is_world_process_zero:
            logger.info(
                "early stopping: %s did not improve by more than %g for %d evaluations; training stopped at "
                "step %d of %d (best %s = %s at step %s).", args.metric_for_best_model,
                self.early_stopping_threshold, self.early_stopping_patience, self.stopped_at, state.max_steps,
                args.metric_for_best_model, state.best_metric, state.best_global_step,
            )


class BestModelReport(TrainerCallback):
    """Says, at the end of training, which checkpoint ``--load_best_model_at_end`` brought back."""

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint and state.is_world_process_zero:
            logger.info("best model: step %s (%s = %s), from %s; it is the model saved in %s.",
                        state.best_global_step, args.metric_for_best_model, state.best_metric,
                        state.best_model_checkpoint, args.output_dir)


def evaluation_callbacks(
    metrics: list[TaskMetric], *, samples: int | None, patience: int | None, threshold: float
) -> tuple[TaskMetricsCallback | None, list[TrainerCallback]]:
    """The callbacks of evaluation while training: task metrics (None without any), early stopping, best model.

    Returns:
        The task-metrics callback for ``build_trainer(task_metrics=...)``, and the other callbacks.
    """
    task = TaskMetricsCallback(metrics, samples=samples) if metrics and samples != 0 else None
    others: list[TrainerCallback] = [BestModelReport()]
    if patience:
        others.append(ResumableEarlyStopping(patience, threshold))
    return task, others
