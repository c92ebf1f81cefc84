"""Stage 3 of the data flow: prompt/response examples -> ``input_ids`` + ``labels``.

Contract: each rendered sample is ``BOS? + prompt + response + EOS`` tokenized as ONE text
(so the prompt/response boundary cannot drift the way re-tokenizing the prompt alone
does), with ``labels == input_ids`` except ``IGNORE_INDEX`` on the prompt (unless
``train_on_inputs``) and on the first token. EOS is always present and supervised, also
when the response had to be cut. A sample whose prompt leaves no room for a response is
dropped and counted, never kept as an all-masked sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


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

    def note_truncation(self, cut: int) -> None:
        """Count one sample that lost ``cut`` tokens to the length limit."""
        self.truncated += 1
        self.truncated_tokens += cut
        self.max_truncated_tokens = max(self.max_truncated_tokens, cut)

    def describe(self) -> str:
        share = self.supervised_tokens / max(self.tokens, 1)
        return (
            f"{self.kept} samples, {self.tokens} tokens ({share:.0%} supervised), "
            f"{self.truncated} responses truncated, {self.dropped_long_prompt} dropped (prompt too long)"
        )


def _tokenizer_appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def _prompt_boundaries(tokenizer: PreTrainedTokenizerBase, prompts: list[str], texts: list[str]
                       ) -> tuple[list[list[int]], list[int]]:
    """Token ids of each whole text and how many of its leading tokens belong to the prompt."""
    if tokenizer.is_fast:
        encoded = tokenizer(texts, return_offsets_mapping=True)
        boundaries = []
        for prompt, offsets in zip(prompts, encoded["offset_mapping"]):
            # A token that starts inside the prompt is prompt, also one that a merge carried across.
            boundaries.append(sum(1 for start, _ in offsets if start < len(prompt)) if prompt else 0)
        return encoded["input_ids"], boundaries
    # Slow tokenizers have no offsets: the prompt is the longest common prefix of the two encodings.
    full = tokenizer(texts).input_ids
    alone = tokenizer(prompts).input_ids
    boundaries = []
    for text_ids, prompt_ids in zip(full, alone):
        common = 0
        while common < min(len(text_ids), len(prompt_ids)) and text_ids[common] == prompt_ids[common]:
            common += 1
        boundaries.append(common)
    return full, boundaries


def render_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, str]],
    *,
    max_seq_length: int,
    train_on_inputs: bool = False,
    batch_size: int = 1000,
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """Tokenize prompt/response examples into training samples.

    Args:
        tokenizer: Adds BOS as it defines it; must have an EOS token.
        examples: ``{"prompt": str, "response": str}`` dicts.
        max_seq_length: Maximum tokens per sample, EOS included.
        train_on_inputs: Supervise the prompt too.
        batch_size: Examples tokenized per call.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` and the rendering statistics.

    Raises:
        DataFormatError: if the tokenizer has no EOS token, or every sample was dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
    strip_eos = _tokenizer_appends_eos(tokenizer)
    stats = RenderStats()
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [ex["prompt"] for ex in batch]
        texts = [ex["prompt"] + ex["response"] for ex in batch]
        all_ids, boundaries = _prompt_boundaries(tokenizer, prompts, texts)
        for offset, (ids, boundary) in enumerate(zip(all_ids, boundaries)):
            if strip_eos and ids and ids[-1] == eos:
                ids = ids[:-1]
            ids = ids + [eos]
            if boundary >= max_seq_length - 1:
                stats.dropped_long_prompt += 1
                stats.dropped_indices.append(start + offset)
                continue
            if len(ids) > max_seq_length:
                stats.note_truncation(len(ids) - max_seq_length)
                ids = ids[: max_seq_length - 1] + [eos]
            labels = list(ids)
            masked = 1 if train_on_inputs else max(boundary, 1)
            labels[:masked] = [IGNORE_INDEX] * masked
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            stats.kept += 1
            stats.tokens += len(ids)
            stats.supervised_tokens += len(ids) - masked
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
    return out, stats
