"""The task's own metric at every evaluation during training, on the in-memory model.

Stage contract: flat settings (``TaskEvalSettings``) and the validation records in; a list of
``TaskMetric`` out. Each holds its items (validation records, HumanEval or MBPP problems,
TruthfulQA questions) and scores any slice of them: ``score(model, tokenizer, items)`` returns
each metric's mean over those items. Means of disjoint slices combine exactly into the mean over
their union (``combine``), which lets the training side split a subset across processes and
gather the parts, so that a metric is computed once over the whole subset, never per process.
Nothing here knows about processes or the Trainer (``train/eval_metrics.py`` does).

Which metric a task gets, as after training (``tasks.py``), with the same prompts and scoring:

- ``summarization``: ROUGE-1/2/L/Lsum of generated summaries of the validation records;
- ``code-generation``: HumanEval pass@1 with ``--humaneval_file``, MBPP pass@1 with ``--mbpp_file``
  (greedy, one completion per problem, run in the sandbox of ``humaneval.py``);
- ``completion`` and ``chat``: TruthfulQA MC1/MC2 with ``--truthfulqa_file`` (never the hub
  data set in the middle of a run).

The Trainer names them ``eval_<key>`` (``eval_rouge1``, ``eval_humaneval_pass@1``,
``eval_mbpp_pass@1``, ``eval_truthfulqa_mc2``), the names ``--metric_for_best_model`` takes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.evaluate.humaneval import evaluate_humaneval
from lmtune.evaluate.multiple_choice import score_truthfulqa
from lmtune.evaluate.rouge import ROUGE_TYPES, compute_rouge
from lmtune.evaluate.seq2seq_scoring import score_truthfulqa_seq2seq
from lmtune.evaluate.tasks import HUMANEVAL, MBPP, ROUGE, TaskEvalSettings, generate_summaries, load_code_problems
from lmtune.evaluate.truthfulqa import load_truthfulqa

TRUTHFULQA = "truthfulqa"
Scorer = Callable[[PreTrainedModel, PreTrainedTokenizerBase, list], dict[str, float]]


@dataclass(frozen=True)
class TaskMetric:
    """One benchmark scored at every evaluation: its items, and the means it reports over any slice."""

    name: str
    keys: tuple[str, ...]
    items: list
    score: Scorer


def combine(parts: Iterable[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The means over the union of slices, from each slice's ``(means, item count)``.

    Returns:
        Each key's mean weighted by its slice's item count; {} when no slice has an item.
    """
    parts = [(means, count) for means, count in parts if count > 0]
    total = sum(count for _, count in parts)
    if not total:
        return {}
    return {key: sum(means[key] * count for means, count in parts) / total for key in parts[0][0]}


def metric_keys(settings: TaskEvalSettings, *, skip: Iterable[str] = ()) -> list[str]:
    """The keys (without ``eval_``) the in-training metrics of these settings report; reads no file."""
    return [key for name, keys in _planned(settings) if name not in set(skip) for key in keys]


def _planned(settings: TaskEvalSettings) -> list[tuple[str, tuple[str, ...]]]:
    if settings.task == "summarization":
        return [(ROUGE, ROUGE_TYPES)]
    if settings.task == "code-generation":
        files = ((HUMANEVAL, settings.humaneval_file), (MBPP, settings.mbpp_file))
        return [(name, (f"{name}_pass@1",)) for name, path in files if path]
    if settings.truthfulqa_file:
        return [(TRUTHFULQA, ("truthfulqa_mc1", "truthfulqa_mc2"))]
    return []


@contextlib.contextmanager
def _data_notices_off() -> Iterator[None]:
    """The records were read and reported once, when the run prepared them; not again at each evaluation."""
    data_logger = logging.getLogger("lmtune.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        data_logger.setLevel(level)


def _rouge_scorer(settings: TaskEvalSettings) -> Scorer:
    def score(model, tokenizer, records: list) -> dict[str, float]:
        with _data_notices_off():
            predictions, references = generate_summaries(
                model, tokenizer, records, max_source_length=settings.max_source_length,
                max_target_length=settings.max_target_length, num_beams=settings.num_beams,
                batch_size=settings.batch_size, skip_invalid=settings.skip_invalid_records,
            )
        return compute_rouge(predictions, references)

    return score


def _code_scorer(settings: TaskEvalSettings, name: str, stops: tuple[str, ...]) -> Scorer:
    def score(model, tokenizer, problems: list) -> dict[str, float]:
        # Greedy, one completion each: pass@1 without sampling noise between evaluations.
        result = evaluate_humaneval(
            model, tokenizer, problems, n_samples=1, k=(1,), max_new_tokens=settings.humaneval_max_new_tokens,
            batch_size=settings.batch_size, stop_sequences=stops, metric_prefix=name,
        )
        return {f"{name}_pass@1": result[f"{name}_pass@1"]}

    return score


def _truthfulqa_scorer(settings: TaskEvalSettings) -> Scorer:
    def score(model, tokenizer, questions: list) -> dict[str, float]:
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        scorer = score_truthfulqa_seq2seq if seq2seq else score_truthfulqa
        return scorer(model, tokenizer, questions, batch_size=settings.batch_size)

    return score


def build_task_metrics(
    settings: TaskEvalSettings, validation_records: Iterable[dict[str, Any]] | None, *, skip: Iterable[str] = ()
) -> list[TaskMetric]:
    """The metrics to compute at each evaluation, their items loaded (files are checked here, before training).

    Args:
        settings: The run's evaluation flags.
        validation_records: Raw validation records (summarization).
        skip: Metric names computed another way (``rouge`` when the Seq2SeqTrainer generates).

    Raises:
        DataFormatError: for a missing or malformed problems or questions file.
    """
    metrics = []
    for name, keys in _planned(settings):
        if name in set(skip):
            continue
        if name == ROUGE:
            if validation_records is None:
                continue
            metrics.append(TaskMetric(name, keys, list(validation_records), _rouge_scorer(settings)))
        elif name in (HUMANEVAL, MBPP):
            problems, stops = load_code_problems(settings.humaneval_file if name == HUMANEVAL else settings.mbpp_file,
                                                 name)
            metrics.append(TaskMetric(name, keys, problems, _code_scorer(settings, name, stops)))
        else:
            questions = load_truthfulqa(settings.truthfulqa_file, cache_dir=settings.cache_dir)
            metrics.append(TaskMetric(name, keys, questions, _truthfulqa_scorer(settings)))
    return metrics
