"""The whole data flow in one call: sources -> formats -> render -> (pack) -> datasets.

Contract: ``prepare_data`` returns tokenized train/validation ``datasets.Dataset`` objects
ready for the collator, plus statistics, and raises ``DataFormatError`` for any bad
input. It runs before the model loads, so a broken record costs seconds, not hours.
Each task maps to one renderer in ``TASK_RENDERERS`` (``SEQ2SEQ_RENDERERS`` for encoder-decoder
models, whose samples are an encoder input and separate decoder labels): it checks a split's
records and returns the task's ``RowFormat``, which ``pipeline.render_dataset`` runs through
the one tokenize-and-mask function with ``datasets.map``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.chat import chat_rows
from lmtune.data.formats import check_records, instruction_segments
from lmtune.data.empty_records import drop_empty_records
from lmtune.data.formats import task_for_fields
from lmtune.data.packing import PackingStats, pack_examples
from lmtune.data.pipeline import MapSettings, RowFormat, render_dataset
from lmtune.data.render import RenderStats, report_prompt_drops, require_eos
from lmtune.data.seq2seq import SEQ2SEQ_TASKS, check_seq2seq_packing, seq2seq_rows
from lmtune.data.sources import load_splits
from lmtune.data.summarization import summarization_rows
from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderSettings:
    """How records become samples (flat copies of the data flags)."""

    max_seq_length: int = 512
    max_source_length: int = 384
    max_target_length: int = 128
    train_on_inputs: bool = False
    skip_invalid_records: bool = False
    chat_template: str | None = None
    strict_records: bool = False


# A renderer checks one split's raw records and says how each becomes segments (the task's RowFormat).
Renderer = Callable[[datasets.Dataset, str, PreTrainedTokenizerBase, RenderSettings], RowFormat]


def render_instructions(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings
) -> RowFormat:
    """Completion and code-generation: instruction records -> prompt, response, EOS."""
    fmt, kept = check_records(dataset, dataset.column_names, source, skip_invalid=settings.skip_invalid_records)
    max_seq_length = settings.max_seq_length
    return RowFormat(kept, instruction_segments(fmt, require_eos(tokenizer)), key={"format": fmt.name},
                     max_length=max_seq_length, train_on_inputs=settings.train_on_inputs,
                     finish=lambda stats, _: report_prompt_drops(stats, max_seq_length))


def render_chat(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings
) -> RowFormat:
    """Chat: conversations (messages, ShareGPT/SlimOrca conversations, orca_dpo_pairs) -> one sample each."""
    return chat_rows(
        dataset, source, tokenizer, chat_template=settings.chat_template, max_seq_length=settings.max_seq_length,
        max_source_length=settings.max_source_length, train_on_inputs=settings.train_on_inputs,
        skip_invalid=settings.skip_invalid_records,
    )


def render_summaries(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings
) -> RowFormat:
    """Summarization: article/highlights records -> article + instruction prompt, highlights target."""
    return summarization_rows(
        dataset, source, tokenizer, max_seq_length=settings.max_seq_length,
        max_source_length=settings.max_source_length, train_on_inputs=settings.train_on_inputs,
        skip_invalid=settings.skip_invalid_records,
    )


TASK_RENDERERS: dict[str, Renderer] = {
    "completion": render_instructions,
    "code-generation": render_instructions,
    "chat": render_chat,
    "summarization": render_summaries,
}


def render_seq2seq(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings, *, task: str
) -> RowFormat:
    """Any task on an encoder-decoder model: source -> encoder ``input_ids``, target -> ``labels``."""
    return seq2seq_rows(
        dataset, source, tokenizer, task=task, max_source_length=settings.max_source_length,
        max_target_length=settings.max_target_length, chat_template=settings.chat_template,
        skip_invalid=settings.skip_invalid_records,
    )


SEQ2SEQ_RENDERERS: dict[str, Renderer] = {task: partial(render_seq2seq, task=task) for task in SEQ2SEQ_TASKS}


@dataclass
class PreparedData:
    train: datasets.Dataset | None = None
    validation: datasets.Dataset | None = None
    raw_validation: datasets.Dataset | None = None
    stats: dict[str, RenderStats] = field(default_factory=dict)
    packing: PackingStats | None = None
    task: str | None = None  # the task the data was rendered for: --task, or chat picked from the fields


def _report(split: str, source: str, stats: RenderStats) -> None:
    """One line per split; a warning when samples were dropped, so it shows at any log level."""
    log = logger.warning if stats.dropped_long_prompt else logger.info
    log("%s (%s): %s.", split, source, stats.describe())


def _head(dataset: datasets.Dataset | datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` records; a streamed split is read only that far."""
    if isinstance(dataset, datasets.IterableDataset):
        if limit is None:
            logger.warning("--streaming without --max_train_samples/--max_eval_samples reads the whole stream; "
                           "every record is checked and tokenized before training starts.")
        records = list(islice(dataset, limit))
        if not records:
            raise ConfigError("the streamed split holds no records.")
        return datasets.Dataset.from_list(records)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _render_split(
    split: str, records: datasets.Dataset, source: str, task: str, renderer: Renderer,
    tokenizer: PreTrainedTokenizerBase, settings: RenderSettings, mapping: MapSettings,
) -> tuple[datasets.Dataset, datasets.Dataset, RenderStats]:
    """(records kept, rendered samples, statistics) of one split; empty records dropped first."""
    kept = drop_empty_records(records, task=task, source=source, strict=settings.strict_records)
    rendered, stats = render_dataset(kept, renderer(kept, source, tokenizer, settings), tokenizer, mapping,
                                     description=f"tokenizing {split}")
    _report(split, source, stats)
    return kept, rendered, stats


def prepare_data(
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str = "completion",
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str | None = None,
    validation_split: str | None = None,
    validation_split_percentage: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    dataset_concatenation: bool = False,
    seq2seq: bool = False,
    need_train: bool = True,
    need_validation: bool = False,
    settings: RenderSettings = RenderSettings(),
    seed: int = 42,
    cache_dir: str | None = None,
    token: str | None = None,
    streaming: bool = False,
    preprocessing_num_workers: int | None = None,
    overwrite_cache: bool = False,
    keep_in_memory: bool = False,
    dataset_cache_directory: str | None = None,
) -> PreparedData:
    """Load, check, tokenize and (optionally) pack the train and validation data.

    ``max_train_samples``/``max_eval_samples`` keep the first N records (before packing).
    ``seq2seq`` renders for an encoder-decoder model (``lmtune.data.seq2seq``).
    ``streaming`` reads a ``--dataset_name`` split as a stream, only as far as the limits say.
    ``preprocessing_num_workers``, ``overwrite_cache``, ``keep_in_memory`` and
    ``dataset_cache_directory`` say how rendering runs and is cached (``lmtune.data.pipeline``).

    Raises:
        ConfigError: for an unsupported task, packing asked for a seq2seq model, or when
            validation is needed but there is none.
        DataFormatError: for any unreadable file or bad record.
    """
    renderers = SEQ2SEQ_RENDERERS if seq2seq else TASK_RENDERERS
    if task not in renderers:
        raise ConfigError(f"--task {task} is not supported; choose one of {', '.join(renderers)}.")
    if seq2seq:
        check_seq2seq_packing(dataset_concatenation)
    splits = load_splits(
        train_file=train_file, validation_file=validation_file, dataset_name=dataset_name,
        dataset_config_name=dataset_config_name, train_split=train_split, validation_split=validation_split,
        validation_split_percentage=validation_split_percentage, seed=seed, cache_dir=cache_dir, token=token,
        skip_invalid=settings.skip_invalid_records, streaming=streaming,
    )
    if need_validation and "validation" not in splits:
        raise ConfigError(
            "--do_eval needs validation data: pass --validation_file, a dataset with a validation split "
            "(or --validation_split NAME), or --validation_split_percentage N to hold out N% of the training data."
        )
    if splits:
        task = task_for_fields(task, next(iter(splits.values())).column_names)
    renderer = renderers[task]
    prepared = PreparedData(task=task)
    source = dataset_name or train_file or ""
    mapping = MapSettings(num_proc=preprocessing_num_workers, cache_dir=dataset_cache_directory,
                          overwrite_cache=overwrite_cache, keep_in_memory=keep_in_memory, cacheable=not streaming)
    if need_train and "train" in splits:
        _, prepared.train, prepared.stats["train"] = _render_split(
            "train", _head(splits["train"], max_train_samples), source, task, renderer, tokenizer, settings, mapping
        )
        if dataset_concatenation:
            # Best-fit packing looks at every sample length at once, so it runs here on lists, not in a map.
            samples, prepared.packing = pack_examples(prepared.train.to_dict(), settings.max_seq_length)
            logger.info("train: %s.", prepared.packing.describe())
            prepared.train = datasets.Dataset.from_dict(samples)
    if need_validation:
        prepared.raw_validation, prepared.validation, prepared.stats["validation"] = _render_split(
            "validation", _head(splits["validation"], max_eval_samples), validation_file or source,
            task, renderer, tokenizer, settings, mapping,
        )
    return prepared
