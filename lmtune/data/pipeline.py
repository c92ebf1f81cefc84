"""Rendering a split with ``datasets.Dataset.map``: record -> segments -> tokens and mask, cached.

Contract: ``render_dataset`` runs a task's ``RowFormat`` (which records are usable, and how one
becomes segments) and :func:`lmtune.data.render.tokenize_segment_batch` over a dataset in one
``map`` pass, so that ``--preprocessing_num_workers`` splits the work between processes, and the
result lands in the datasets cache: a second run with the same inputs (or another rank of the
same node, under ``main_process_first``) reads it instead of tokenizing again. The cache key
is the input dataset's fingerprint (datasets derives it from the records' content, also for
records read by hand) plus everything the samples depend on: the task's format, the length
limits, the tokenizer, the rendering code itself. ``--overwrite_cache`` tokenizes afresh;
``--keep_in_memory`` neither reads nor writes cache files. Per-sample statistics are columns of
the same pass, summed afterwards; dropped samples are removed after counting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

import lmtune
from lmtune.data.render import (
    STAT_COLUMNS,
    RenderStats,
    Segment,
    collect_stats,
    tokenize_segment_batch,
)

SHORTENED = "shortened"
# The modules whose code decides the samples: part of the cache key, so that an edited or upgraded
# lmtune never reads samples an older one wrote (datasets cannot see into functions it hashes by name).
_RENDERING_MODULES = ("render.py", "pipeline.py", "formats.py", "chat.py", "chat_format.py", "summarization.py",
                      "seq2seq.py", "sources.py", "json_records.py")


def _code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(lmtune.__version__.encode())
    for name in _RENDERING_MODULES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()
# Record -> (segments or None when the format itself drops it, how much the format shortened it).
ToSegments = Callable[[dict, int], tuple[list[Segment] | None, int]]


@dataclass(frozen=True)
class RowFormat:
    """One task's reading of a split, decided before anything is tokenized.

    Attributes:
        kept: Indices of the records that passed validation, in order.
        to_segments: Turns one kept record (and its index) into segments.
        key: What else the samples depend on (format name, chat template, limits), for the cache key.
        max_length: ``tokenize_segments``'s budget (seq2seq: of the labels).
        max_prompt_length: Drop samples whose prompt is longer.
        train_on_inputs: Supervise the prompt too.
        seq2seq: Encoder input and labels instead of one causal sequence.
        shortened_truncates: A record the format shortened (chat's dropped turns) counts as truncated.
        finish: Logs what rendering dropped or cut, and raises when nothing is left; runs in this
            process after the map (it may hold the dataset, which is not sent to the workers).
    """

    kept: list[int]
    to_segments: ToSegments
    key: dict[str, Any]
    max_length: int
    max_prompt_length: int | None = None
    train_on_inputs: bool = False
    seq2seq: bool = False
    shortened_truncates: bool = False
    finish: Callable[[RenderStats, list[int]], None] | None = field(default=None, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # the workers need no finish (nor what it holds)
        return {**self.__dict__, "finish": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass(frozen=True)
class MapSettings:
    """How the map runs (flat copies of the data flags)."""

    num_proc: int | None = None
    cache_dir: str | None = None
    overwrite_cache: bool = False
    keep_in_memory: bool = False
    cacheable: bool = True  # False for data read from a stream: it has no stable fingerprint


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What rendering depends on: vocabulary, merges, normalizer, special tokens, template, sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, model, str(tokenizer.special_tokens_map),
             str(getattr(tokenizer, "chat_template", None)), tokenizer.padding_side, tokenizer.truncation_side]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class _RenderBatch:
    """The map function; a class so that it pickles to worker processes with the tokenizer it holds."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, row_format: RowFormat):
        self.tokenizer, self.row_format = tokenizer, row_format

    def __call__(self, batch: dict[str, list[Any]], positions: list[int]) -> dict[str, list[Any]]:
        fmt = self.row_format
        names = list(batch)
        segments, shortened = [], []
        for values, position in zip(zip(*(batch[n] for n in names)), positions):
            pieces, short = fmt.to_segments(dict(zip(names, values)), fmt.kept[position])
            segments.append(pieces)
            shortened.append(short)
        out = tokenize_segment_batch(self.tokenizer, segments, max_length=fmt.max_length,
                                     max_prompt_length=fmt.max_prompt_length,
                                     train_on_inputs=fmt.train_on_inputs, seq2seq=fmt.seq2seq)
        out[SHORTENED] = shortened
        return out


def _cache_file(dataset: datasets.Dataset, fingerprint: str, settings: MapSettings) -> str | None:
    if dataset.cache_files:  # a dataset datasets read itself: its cache directory, as for any map
        return None
    root = settings.cache_dir or os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    directory = Path(root) / "lmtune-rendered"
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory / f"rendered-{fingerprint}.arrow")


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo what ``Dataset.map(num_proc=N)`` does to the environment (datasets 5.2).

    It sets ``TOKENIZERS_PARALLELISM=false`` for its workers and then replaces ``os.environ``
    with a copy taken before, so the variable stays set in the process while any code that
    holds the original mapping (a default argument, as in ``train.distributed``) no longer
    sees later changes. Found by a test that read launcher variables after a 2-worker map.
    """
    environ, parallelism = os.environ, os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        os.environ = environ
        if parallelism is None:
            environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            environ["TOKENIZERS_PARALLELISM"] = parallelism


def render_dataset(
    dataset: datasets.Dataset,
    row_format: RowFormat,
    tokenizer: PreTrainedTokenizerBase,
    settings: MapSettings = MapSettings(),
    *,
    description: str = "tokenizing",
) -> tuple[datasets.Dataset, RenderStats]:
    """Tokenize and mask the kept records of ``dataset``; see the module docstring.

    Returns:
        The samples (``input_ids``, ``labels``) and their statistics.

    Raises:
        DataFormatError: what ``row_format.finish`` raises (nothing left to train on), or a
            format's error about a record.
    """
    source = dataset if len(row_format.kept) == len(dataset) else dataset.select(row_format.kept)
    use_cache = settings.cacheable and not settings.keep_in_memory
    # dataset._fingerprint is the datasets library's own identity of the data (no public accessor).
    fingerprint = Hasher.hash([source._fingerprint, row_format.key, row_format.max_length,
                               row_format.max_prompt_length, row_format.train_on_inputs, row_format.seq2seq,
                               tokenizer_fingerprint(tokenizer), _code_fingerprint()])
    with _environment_kept():
        mapped = source.map(
            _RenderBatch(tokenizer, row_format), batched=True, with_indices=True, remove_columns=source.column_names,
            num_proc=settings.num_proc if settings.num_proc and settings.num_proc > 1 else None,
            load_from_cache_file=use_cache and not settings.overwrite_cache, keep_in_memory=not use_cache,
            cache_file_name=_cache_file(source, fingerprint, settings) if use_cache else None,
            new_fingerprint=fingerprint, desc=description,
        )
    stat_names = [*STAT_COLUMNS, SHORTENED]
    columns = mapped.select_columns(stat_names).to_dict()
    stats = collect_stats(columns, indices=row_format.kept,
                          shortened=columns[SHORTENED] if row_format.shortened_truncates else None)
    if row_format.finish is not None:
        row_format.finish(stats, columns[SHORTENED])
    samples = mapped.remove_columns(stat_names)
    if stats.dropped_long_prompt:
        samples = samples.select([i for i, gone in enumerate(columns["dropped"]) if not gone])
    return samples, stats


def render_records(
    records: Iterable[dict], build: Callable[[datasets.Dataset], RowFormat], tokenizer: PreTrainedTokenizerBase
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """:func:`render_dataset` for records in a list (no cache): ``{"input_ids", "labels"}`` lists and stats.

    Args:
        records: Raw records.
        build: Makes the task's ``RowFormat`` for the records as a dataset (it validates them).
        tokenizer: The model's tokenizer.
    """
    dataset = datasets.Dataset.from_list(list(records))
    samples, stats = render_dataset(dataset, build(dataset), tokenizer, MapSettings(cacheable=False),
                                    description=None)
    return samples.to_dict(), stats
