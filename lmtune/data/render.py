"""Stage 3 of the data flow: segments -> ``input_ids`` + ``labels``, for every task and model kind.

A record format (``formats.py``, ``chat.py``, ``summarization.py``, ``seq2seq.py``) turns a
record into *segments*: ``(content, kind)`` pairs whose content is text or token ids and whose
kind says what is learned: ``prompt`` (never supervised), ``answer`` (supervised; the LAST
answer is what a too-long sample loses) or ``end`` (supervised, never cut: EOS, a template's
end-of-turn markup). ``tokenize_segments`` is the one function that makes token ids, labels
and the statistics of a sample from them, the same way for completion, code, chat,
summarization and preference pairs, for causal and seq2seq models alike.

Contract of a causal sample: text segments (they come first) are tokenized as ONE text with
the tokenizer's special tokens (BOS where it adds one), so the prompt/response boundary cannot
drift the way re-tokenizing the prompt alone does; a token that starts inside a prompt segment
is prompt, also one that a merge carried across. Token-id segments follow as they are.
``labels == input_ids`` except ``IGNORE_INDEX`` on prompt tokens (unless ``train_on_inputs``)
and on the first token. A sample longer than ``max_length`` loses the end of its last answer
(what follows it is kept); a sample whose prompt leaves no room for one answer token, or is
longer than ``max_prompt_length``, is dropped and counted, never kept as an all-masked sample.

A seq2seq sample puts the prompt segments in ``input_ids`` (the encoder input, special tokens
as the tokenizer adds them, e.g. T5's ``</s>``) and the answer and end segments in ``labels``,
of which ``max_length`` is then the budget; nothing inside either is masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT, ANSWER, END = "prompt", "answer", "end"
Segment = tuple[str | list[int], str]

# Per-sample statistics columns that tokenize_segments returns beside input_ids and labels.
STAT_COLUMNS = ("tokens", "supervised_tokens", "truncated_tokens", "dropped")


@dataclass
class RenderStats:
    """What rendering did to the data; reported to the user."""

    kept: int = 0
    dropped_long_prompt: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dropped_indices: list[int] = field(default_factory=list)
    truncated_tokens: int = 0  # tokens cut off all truncated samples together
    max_truncated_tokens: int = 0  # the most cut off one sample

    def describe(self) -> str:
        share = self.supervised_tokens / max(self.tokens, 1)
        return (
            f"{self.kept} samples, {self.tokens} tokens ({share:.0%} supervised), "
            f"{self.truncated} responses truncated, {self.dropped_long_prompt} dropped (prompt too long)"
        )


def require_eos(tokenizer: PreTrainedTokenizerBase) -> int:
    """The EOS id every sample ends with.

    Raises:
        DataFormatError: if the tokenizer has none.
    """
    if tokenizer.eos_token_id is None:
        raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
    return tokenizer.eos_token_id


def tokenizer_appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def _text_run(segments: Sequence[Segment]) -> int:
    """How many leading segments are text (joint tokenization); text after token ids is refused."""
    run = 0
    while run < len(segments) and isinstance(segments[run][0], str):
        run += 1
    if any(isinstance(content, str) for content, _ in segments[run:]):
        raise ValueError("text segments must come before token-id segments")
    return run


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode_runs(tokenizer: PreTrainedTokenizerBase, runs: list[list[str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each run's joined text, and where each of its segments but the last ends."""
    texts = ["".join(run) for run in runs]
    out = []
    if tokenizer.is_fast:
        encoded = tokenizer(texts, return_offsets_mapping=True)
        for run, ids, offsets in zip(runs, encoded["input_ids"], encoded["offset_mapping"]):
            ends, end = [], 0
            for text in run[:-1]:
                end += len(text)
                # A token that starts inside the segment is its, also one that a merge carried across
                # (special tokens start at 0). An empty leading segment owns nothing.
                ends.append(sum(1 for start, _ in offsets if start < end) if end else 0)
            out.append((ids, ends))
        return out
    # Slow tokenizers have no offsets: a segment ends where the encodings of the text and of its prefix diverge.
    for run, text in zip(runs, texts):
        ids = tokenizer(text).input_ids
        prefixes = ["".join(run[: number + 1]) for number in range(len(run) - 1)]
        out.append((ids, [_common_prefix(ids, tokenizer(prefix).input_ids) if prefix else 0 for prefix in prefixes]))
    return out


def _split(ids: list[int], ends: list[int], segments: Sequence[Segment]) -> list[tuple[list[int], str]]:
    """The jointly tokenized text cut back into its segments (each token goes to the segment it starts in)."""
    pieces, start = [], 0
    for (_, kind), end in zip(segments, [*ends, len(ids)]):
        end = min(max(start, end), len(ids))
        pieces.append((ids[start:end], kind))
        start = end
    return pieces


def _limit(pieces: list[tuple[list[int], str]], max_length: int, max_prompt_length: int | None,
           seq2seq: bool) -> tuple[list[tuple[list[int], str]] | None, int]:
    """Cut the last answer so the sample fits; None when the prompt leaves it no room. Returns tokens cut."""
    last = next((i for i in range(len(pieces) - 1, -1, -1) if pieces[i][1] == ANSWER), len(pieces))
    lengths = [len(ids) for ids, _ in pieces]
    prompt, tail = sum(lengths[:last]), sum(lengths[last + 1:])
    room = max_length - tail - (0 if seq2seq else prompt)
    if (max_prompt_length is not None and prompt > max_prompt_length) or room < 1:
        return None, 0
    if last == len(pieces) or lengths[last] <= room:
        return pieces, 0
    return pieces[:last] + [(pieces[last][0][:room], ANSWER)] + pieces[last + 1:], lengths[last] - room


def _assemble(pieces: list[tuple[list[int], str]], train_on_inputs: bool, seq2seq: bool
              ) -> tuple[list[int], list[int], int]:
    """``input_ids``, ``labels`` and the number of supervised labels."""
    ids: list[int] = []
    labels: list[int] = []
    if seq2seq:
        for piece, kind in pieces:
            (ids if kind == PROMPT else labels).extend(piece)
        return ids, labels, len(labels)
    supervised = 0
    for piece, kind in pieces:
        ids.extend(piece)
        if train_on_inputs or kind != PROMPT:
            labels.extend(piece)
            supervised += len(piece)
        else:
            labels.extend([IGNORE_INDEX] * len(piece))
    if labels and labels[0] != IGNORE_INDEX:
        labels[0] = IGNORE_INDEX  # the first token is never predicted
        supervised -= 1
    return ids, labels, supervised


def tokenize_segment_batch(
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Sequence[Segment] | None],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    train_on_inputs: bool = False,
    seq2seq: bool = False,
) -> dict[str, list[Any]]:
    """:func:`tokenize_segments` over many samples, with one tokenizer call for all their texts.

    A ``None`` entry stands for a record its format already dropped (counted as dropped).

    Returns:
        Columns ``input_ids``, ``labels`` and ``STAT_COLUMNS``, one entry per sample; a dropped
        sample has empty ``input_ids``/``labels`` and ``dropped`` True.
    """
    appends_eos = tokenizer_appends_eos(tokenizer) if any(batch) else False
    runs = [_text_run(segments) if segments is not None else 0 for segments in batch]
    texts = [[content for content, _ in segments[:run]] for segments, run in zip(batch, runs) if run]
    encoded = iter(_encode_runs(tokenizer, texts)) if texts else iter(())
    out: dict[str, list[Any]] = {name: [] for name in ("input_ids", "labels", *STAT_COLUMNS)}
    for segments, run in zip(batch, runs):
        pieces: list[tuple[list[int], str]] | None = None
        cut = 0
        if segments is not None:
            pieces = []
            if run:
                ids, ends = next(encoded)
                if appends_eos and not seq2seq and ids and ids[-1] == tokenizer.eos_token_id:
                    ids = ids[:-1]  # the end segment places EOS
                pieces = _split(ids, ends, segments[:run])
            pieces += [(list(content), kind) for content, kind in segments[run:]]
            pieces, cut = _limit(pieces, max_length, max_prompt_length, seq2seq)
        input_ids, labels, supervised = _assemble(pieces, train_on_inputs, seq2seq) if pieces else ([], [], 0)
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["tokens"].append(len(input_ids) + (len(labels) if seq2seq else 0))
        out["supervised_tokens"].append(supervised)
        out["truncated_tokens"].append(cut)
        out["dropped"].append(pieces is None)
    return out


def tokenize_segments(
    tokenizer: PreTrainedTokenizerBase,
    segments: Sequence[Segment],
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    train_on_inputs: bool = False,
    seq2seq: bool = False,
) -> dict[str, Any]:
    """Token ids, labels and statistics of one sample (see the module docstring).

    Example (a preference pair renders as two such samples)::

        tokenize_segments(tok, [(prompt, PROMPT), (chosen, ANSWER), ([tok.eos_token_id], END)], 512)

    Args:
        tokenizer: The model's tokenizer.
        segments: ``(text or token ids, kind)``; kind is ``PROMPT``, ``ANSWER`` or ``END``.
        max_length: Most tokens of the sample (seq2seq: of its labels).
        max_prompt_length: Drop the sample when the tokens before its last answer exceed this.
        train_on_inputs: Supervise prompt tokens too (causal).
        seq2seq: Prompt segments form ``input_ids``, the rest ``labels``.

    Returns:
        ``input_ids``, ``labels``, ``tokens``, ``supervised_tokens``, ``truncated_tokens`` and
        ``dropped`` (then the ids are empty).
    """
    batch = tokenize_segment_batch(tokenizer, [segments], max_length=max_length, max_prompt_length=max_prompt_length,
                                   train_on_inputs=train_on_inputs, seq2seq=seq2seq)
    return {name: column[0] for name, column in batch.items()}


def render_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, str]],
    *,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """Tokenize prompt/response examples into causal training samples (prompt + response + EOS).

    Args:
        tokenizer: Adds BOS as it defines it; must have an EOS token.
        examples: ``{"prompt": str, "response": str}`` dicts.
        max_seq_length: Maximum tokens per sample, EOS included.
        train_on_inputs: Supervise the prompt too.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` and the rendering statistics.

    Raises:
        DataFormatError: if the tokenizer has no EOS token, or every sample was dropped.
    """
    eos = require_eos(tokenizer)
    batch = [[(ex["prompt"], PROMPT), (ex["response"], ANSWER), ([eos], END)] for ex in examples]
    columns = tokenize_segment_batch(tokenizer, batch, max_length=max_seq_length, train_on_inputs=train_on_inputs)
    stats = collect_stats(columns)
    report_prompt_drops(stats, max_seq_length)
    keep = [i for i, dropped in enumerate(columns["dropped"]) if not dropped]
    return {name: [columns[name][i] for i in keep] for name in ("input_ids", "labels")}, stats


def report_prompt_drops(stats: RenderStats, max_seq_length: int) -> None:
    """Warn about prompt/response samples whose prompt filled ``max_seq_length``.

    Raises:
        DataFormatError: when that left nothing to train on.
    """
    if stats.dropped_long_prompt:
        logger.warning(
            "%d sample(s) dropped: the prompt alone fills --max_seq_length %d (first: record %d). "
            "Raise --max_seq_length or shorten those prompts.",
            stats.dropped_long_prompt, max_seq_length, stats.dropped_indices[0],
        )
    if not stats.kept:
        raise DataFormatError(
            f"every sample's prompt is longer than --max_seq_length {max_seq_length}; nothing left to train on."
        )


def collect_stats(columns: dict[str, Sequence[Any]], *, indices: Sequence[int] | None = None,
                  shortened: Sequence[int] | None = None) -> RenderStats:
    """Sum the per-sample statistics columns into one ``RenderStats``.

    Args:
        columns: ``STAT_COLUMNS`` as ``tokenize_segment_batch`` returned them (or a dataset's).
        indices: The record index of each row, for ``dropped_indices`` (default: the row's).
        shortened: Per sample, whether its format shortened it before tokenizing (chat's dropped
            turns); such a sample counts as truncated too.
    """
    stats = RenderStats()
    cuts = columns["truncated_tokens"]
    for index, dropped in enumerate(columns["dropped"]):
        if dropped:
            stats.dropped_long_prompt += 1
            stats.dropped_indices.append(indices[index] if indices is not None else index)
            continue
        stats.kept += 1
        stats.truncated += bool(cuts[index] or (shortened is not None and shortened[index]))
    stats.tokens = sum(columns["tokens"])
    stats.supervised_tokens = sum(columns["supervised_tokens"])
    stats.truncated_tokens = sum(cuts)
    stats.max_truncated_tokens = max(cuts, default=0)
    return stats
