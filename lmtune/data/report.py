"""The ``--dry_run`` data report: what training would see, measured on the prepared data.

Contract: ``build_data_report`` reads the datasets that ``prepare_data`` returned (the very
rows the Trainer would get, packed or not) and never re-tokenizes, so the report cannot
drift from training. It raises ``DataFormatError`` when the loss mask is degenerate: a
sample with no supervised token teaches nothing and, in a batch of its own, yields a NaN
loss. ``format_data_report`` turns the numbers into the text the user reads; supervised
tokens, the ones the loss is computed on, are shown between ``[[`` and ``]]``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.packing import PackingStats
from lmtune.data.render import IGNORE_INDEX, RenderStats
from lmtune.errors import ConfigError, DataFormatError

OPEN_MARK, CLOSE_MARK = "[[", "]]"
# Longer decoded samples are shown as head and tail, so the report stays readable.
MAX_SAMPLE_CHARS = 3000


@dataclass
class SplitReport:
    """Numbers of one split, as rendered (and, for training, packed)."""

    split: str
    source: str
    records: int
    kept: int
    dropped_long_prompt: int
    tokens: int
    min_tokens: int
    median_tokens: float
    max_tokens: int
    truncated: int
    truncated_tokens: int
    max_truncated_tokens: int
    supervised_tokens: int
    eos_supervised: int
    rows: int
    packing_efficiency: float | None = None
    # Seq2seq only: the decoder targets (the numbers above then describe the encoder sources).
    min_target_tokens: int | None = None
    median_target_tokens: float | None = None
    max_target_tokens: int | None = None

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / max(self.tokens, 1)


@dataclass
class StepsEstimate:
    """How many optimizer steps the Trainer will take, computed its way."""

    rows: int
    global_batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    from_max_steps: bool


@dataclass
class DataReport:
    splits: list[SplitReport]
    steps: StepsEstimate | None
    sample_text: str | None
    max_seq_length: int
    dataset_concatenation: bool
    train_on_inputs: bool
    seq2seq: bool = False
    max_source_length: int | None = None
    max_target_length: int | None = None

    def to_metrics(self) -> dict[str, float | int]:
        """Flat numbers (``dry_run_<split>_<name>``), returned by a dry run instead of training metrics."""
        out: dict[str, float | int] = {}
        for split in self.splits:
            for key, value in asdict(split).items():
                if isinstance(value, (int, float)):
                    out[f"dry_run_{split.split}_{key}"] = value
        if self.steps is not None:
            out["dry_run_steps"] = self.steps.total_steps
            out["dry_run_steps_per_epoch"] = self.steps.steps_per_epoch
        return out


def estimate_steps(
    rows: int,
    *,
    per_device_batch_size: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    num_train_epochs: float = 3.0,
    max_steps: int = -1,
    drop_last: bool = False,
) -> StepsEstimate:
    """Optimizer steps of a run, as ``Trainer.set_initial_training_values`` computes them.

    Each process reads every ``world_size``-th batch (accelerate shards batches evenly);
    a step accumulates ``gradient_accumulation_steps`` batches, and a last partial group
    still makes a step.
    """
    batches = rows // per_device_batch_size if drop_last else math.ceil(rows / per_device_batch_size)
    per_process = math.ceil(batches / max(world_size, 1))
    steps_per_epoch = max(math.ceil(per_process / gradient_accumulation_steps), 1)
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
    return StepsEstimate(
        rows=rows, global_batch_size=per_device_batch_size * max(world_size, 1) * gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch, total_steps=total, epochs=total / steps_per_epoch,
        from_max_steps=max_steps > 0,
    )


def iter_samples(dataset: datasets.Dataset) -> Iterator[tuple[int, list[int], list[int]]]:
    """Yield ``(row, input_ids, labels)`` per sample; packed rows are split where positions restart."""
    packed = "position_ids" in dataset.column_names
    columns = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels")
    row = 0
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1000):
        for index, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
            if not packed:
                yield row, ids, labels
            else:
                positions = batch["position_ids"][index]
                starts = [i for i, position in enumerate(positions) if position == 0] + [len(ids)]
                for begin, end in zip(starts, starts[1:]):
                    yield row, ids[begin:end], labels[begin:end]
            row += 1


def _measure(dataset: datasets.Dataset, split: str, eos_id: int | None
             ) -> tuple[list[int], list[int], int, int]:
    """Input lengths, label lengths, supervised tokens and samples whose labels end in a supervised EOS.

    For a causal LM labels align with inputs; for seq2seq they are the decoder's own sequence.

    Raises:
        DataFormatError: when no token at all is supervised, or some sample has none.
    """
    lengths, label_lengths, supervised, eos_supervised, empty = [], [], 0, 0, []
    for row, ids, labels in iter_samples(dataset):
        count = sum(label != IGNORE_INDEX for label in labels)
        if count == 0:
            empty.append((len(lengths), row))
        lengths.append(len(ids))
        label_lengths.append(len(labels))
        supervised += count
        eos_supervised += bool(labels) and labels[-1] == eos_id
    if not lengths:
        raise DataFormatError(f"the {split} data has no samples after preparation; nothing to train or evaluate on.")
    if supervised == 0:
        raise DataFormatError(
            f"the {split} data has no supervised tokens at all (every label is {IGNORE_INDEX}): the loss would be "
            "undefined. Check that the records' response fields are filled, or pass --train_on_inputs True."
        )
    if empty:
        sample, row = empty[0]
        raise DataFormatError(
            f"{split} sample {sample} (row {row}) has no supervised tokens (every label is {IGNORE_INDEX}), and "
            f"{len(empty)} sample(s) in all: they teach nothing and a batch of them has no loss. Fix those "
            "records' responses or raise --max_seq_length."
        )
    return lengths, label_lengths, supervised, eos_supervised


def _split_report(
    split: str, source: str, dataset: datasets.Dataset, stats: RenderStats, eos_id: int | None,
    packing: PackingStats | None, seq2seq: bool,
) -> SplitReport:
    lengths, targets, supervised, eos_supervised = _measure(dataset, split, eos_id)
    report = SplitReport(
        split=split, source=source, records=stats.kept + stats.dropped_long_prompt, kept=stats.kept,
        dropped_long_prompt=stats.dropped_long_prompt, tokens=sum(lengths), min_tokens=min(lengths),
        median_tokens=statistics.median(lengths), max_tokens=max(lengths), truncated=stats.truncated,
        truncated_tokens=stats.truncated_tokens, max_truncated_tokens=stats.max_truncated_tokens,
        supervised_tokens=supervised, eos_supervised=eos_supervised, rows=len(dataset),
        packing_efficiency=packing.efficiency if packing is not None else None,
    )
    if seq2seq:
        report.tokens += sum(targets)
        report.min_target_tokens, report.max_target_tokens = min(targets), max(targets)
        report.median_target_tokens = statistics.median(targets)
    return report


def mark_supervised(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Decode one sample with its supervised spans between ``[[`` and ``]]``.

    Consecutive tokens with the same supervision are decoded together, so words are not
    split at token boundaries (only at the prompt/response boundary).
    """
    parts: list[str] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end < len(input_ids) and (labels[end] != IGNORE_INDEX) == (labels[start] != IGNORE_INDEX):
            continue
        text = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        parts.append(f"{OPEN_MARK}{text}{CLOSE_MARK}" if labels[start] != IGNORE_INDEX else text)
        start = end
    return _shorten("".join(parts))


def _shorten(text: str) -> str:
    if len(text) <= MAX_SAMPLE_CHARS:
        return text
    half = MAX_SAMPLE_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters not shown ...]\n{text[-half:]}"


def mark_seq2seq(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Decode one encoder-decoder sample: the source as the encoder reads it, the target between ``[[ ]]``."""
    source = tokenizer.decode(list(input_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    target = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)
    return _shorten(f"source (encoder input):\n{source}\ntarget (decoder labels):\n{OPEN_MARK}{target}{CLOSE_MARK}")


def build_data_report(
    tokenizer: PreTrainedTokenizerBase,
    *,
    train: datasets.Dataset | None,
    validation: datasets.Dataset | None,
    stats: dict[str, RenderStats],
    packing: PackingStats | None,
    sources: dict[str, str],
    max_seq_length: int,
    dataset_concatenation: bool = False,
    train_on_inputs: bool = False,
    steps: StepsEstimate | None = None,
    seq2seq: bool = False,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> DataReport:
    """Measure the prepared data and check its loss mask.

    Args:
        tokenizer: The run's tokenizer (EOS id, decoding the shown sample).
        train: Prepared training rows (packed or not), or None.
        validation: Prepared validation samples, or None.
        stats: ``PreparedData.stats``: rendering statistics per split.
        packing: ``PreparedData.packing`` when ``--dataset_concatenation`` packed the train rows.
        sources: File or dataset name per split, for the report.
        max_seq_length: ``--max_seq_length``.
        dataset_concatenation: ``--dataset_concatenation``.
        train_on_inputs: ``--train_on_inputs``.
        steps: The optimizer-step estimate (``estimate_steps``) for the train rows.
        seq2seq: Encoder-decoder samples (``input_ids`` the source, ``labels`` the target).
        max_source_length: ``--max_source_length`` (seq2seq).
        max_target_length: ``--max_target_length`` (seq2seq).

    Returns:
        The report; ``format_data_report`` renders it.

    Raises:
        ConfigError: when there is no data at all (neither --do_train nor --do_eval).
        DataFormatError: when a split has no supervised token, or a sample has none.
    """
    if train is None and validation is None:
        raise ConfigError("--dry_run prepared no data: it reports what --do_train and --do_eval would use; "
                          "add --do_train (and --do_eval).")
    splits, sample_text = [], None
    for split, dataset in (("train", train), ("validation", validation)):
        if dataset is None:
            continue
        split_packing = packing if split == "train" else None
        splits.append(_split_report(split, sources.get(split, ""), dataset, stats[split], tokenizer.eos_token_id,
                                    split_packing, seq2seq))
        if sample_text is None:
            _, ids, labels = next(iter_samples(dataset))
            sample_text = (mark_seq2seq if seq2seq else mark_supervised)(tokenizer, ids, labels)
    return DataReport(splits=splits, steps=steps, sample_text=sample_text, max_seq_length=max_seq_length,
                      dataset_concatenation=dataset_concatenation, train_on_inputs=train_on_inputs,
                      seq2seq=seq2seq, max_source_length=max_source_length, max_target_length=max_target_length)


def _median(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _token_lines(report: SplitReport, limits: DataReport) -> list[str]:
    """The records, tokens and truncated lines; seq2seq names its source and target limits."""
    if limits.seq2seq:
        drop_rule = f"the source is longer than --max_source_length {limits.max_source_length}"
        cut_rule = f"target(s) longer than --max_target_length {limits.max_target_length}"
        lengths = (f"source per sample min {report.min_tokens}, median {_median(report.median_tokens)}, "
                   f"max {report.max_tokens}; target min {report.min_target_tokens}, "
                   f"median {_median(report.median_target_tokens)}, max {report.max_target_tokens}")
    else:
        drop_rule = f"the prompt alone fills --max_seq_length {limits.max_seq_length}"
        cut_rule = f"sample(s) longer than --max_seq_length {limits.max_seq_length}"
        lengths = (f"per sample min {report.min_tokens}, median {_median(report.median_tokens)}, "
                   f"max {report.max_tokens}")
    dropped = f", {report.dropped_long_prompt} dropped ({drop_rule})" if report.dropped_long_prompt else ", none dropped"
    lines = [f"  records     {report.records} read, {report.kept} kept{dropped}",
             f"  tokens      {report.tokens} in all; {lengths}"]
    if report.truncated:
        amount = (f", {report.truncated_tokens} tokens cut (at most {report.max_truncated_tokens} from one sample)"
                  if report.truncated_tokens else "")
        lines.append(f"  truncated   {report.truncated} {cut_rule}{amount}")
    else:
        lines.append(f"  truncated   none (every sample fits {cut_rule.split(' longer than ')[1]})")
    return lines


def _split_lines(report: SplitReport, limits: DataReport) -> list[str]:
    lines = [f"{report.split} data: {report.source}", *_token_lines(report, limits)]
    max_seq_length, concatenation = limits.max_seq_length, limits.dataset_concatenation
    lines.append(f"  supervised  {report.supervised_tokens} tokens, {report.supervised_share:.1%} of all "
                 "(the loss is computed on these)")
    if report.eos_supervised == report.kept:
        lines.append("  EOS         supervised in every sample: the model learns to stop")
    else:
        lines.append(f"  EOS         supervised in {report.eos_supervised} of {report.kept} samples: the others "
                     "do not teach the model to stop")
    if report.packing_efficiency is not None:
        lines.append(f"  packing     {report.kept} samples in {report.rows} rows of {max_seq_length} tokens: "
                     f"{report.packing_efficiency:.1%} of row slots hold tokens (--dataset_concatenation)")
    elif report.split == "train" and not concatenation and not limits.seq2seq:
        lines.append("  packing     off: each batch is padded to its longest sample (--dataset_concatenation "
                     "packs samples into full rows)")
    return lines


def _steps_line(steps: StepsEstimate) -> str:
    per_epoch = (f"{steps.rows} rows / global batch {steps.global_batch_size} "
                 f"= {steps.steps_per_epoch} optimizer steps per epoch")
    if steps.from_max_steps:
        return f"steps         {per_epoch}; --max_steps {steps.total_steps} = {steps.epochs:.2f} epochs"
    return f"steps         {per_epoch}; {steps.epochs:g} epochs = {steps.total_steps} steps"


def format_data_report(report: DataReport) -> str:
    """The report as the user reads it."""
    lines = ["lmtune dry run: the data as training would see it (no weights loaded, nothing trained)", ""]
    for split in report.splits:
        lines += _split_lines(split, report) + [""]
    if report.steps is not None:
        lines += [_steps_line(report.steps),
                  "              (global batch = per-device batch x processes x --gradient_accumulation_steps)",
                  ""]
    if report.sample_text is not None:
        inputs = "prompt and response" if report.train_on_inputs else "response"
        inputs = "target" if report.seq2seq else inputs
        lines += [f"first sample, decoded; {OPEN_MARK} {CLOSE_MARK} mark the supervised tokens (the {inputs}):",
                  report.sample_text]
    return "\n".join(lines)


__all__ = [
    "DataReport", "SplitReport", "StepsEstimate", "build_data_report", "estimate_steps", "format_data_report",
    "iter_samples", "mark_seq2seq", "mark_supervised",
]
