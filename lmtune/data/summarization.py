"""Summarization data (CNN/DailyMail style): ``article``/``highlights`` records -> samples.

Contract: a sample is ``BOS? + article + "\\nSummarize the highlights of this article.\\n" +
highlights + EOS``, as the reference lays it out (instruction after the article), with the article
cut at the end so that the prompt fits ``max_source_length`` tokens and the highlights cut so the
sample fits ``max_seq_length`` (EOS always kept). The prompt is masked unless ``train_on_inputs``.
``summarization_prompts`` gives the same prompts as text for ROUGE generation, and
``summarization_references`` the untruncated highlights to score against.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from lmtune.data.chat_format import PieceEncoder
from lmtune.data.formats import RecordFormat, to_examples
from lmtune.data.render import IGNORE_INDEX, RenderStats
from lmtune.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

SUMMARIZE_INSTRUCTION = "\nSummarize the highlights of this article.\n"
SUMMARIZATION_FORMAT = RecordFormat(
    "article-highlights", ("article", "highlights"), (),
    lambda record: {"article": record["article"], "highlights": record["highlights"]},
)


def _article_budget(encoder: PieceEncoder, max_source_length: int) -> tuple[list[int], int]:
    """The instruction's ids and how many article tokens fit beside it (and BOS) in the prompt.

    Raises:
        ConfigError: if ``max_source_length`` leaves no room for the article.
    """
    instruction = encoder.encode(SUMMARIZE_INSTRUCTION, first=False)
    budget = max_source_length - len(encoder.bos) - len(instruction)
    if budget < 1:
        raise ConfigError(
            f"--max_source_length {max_source_length} leaves no room for the article: the instruction "
            f"{SUMMARIZE_INSTRUCTION!r} alone takes {len(instruction) + len(encoder.bos)} tokens; raise it."
        )
    return instruction, budget


def summary_prompt_ids(encoder: PieceEncoder, article: str, max_source_length: int) -> tuple[list[int], bool]:
    """Prompt token ids for one article, and whether the article was cut to fit."""
    instruction, budget = _article_budget(encoder, max_source_length)
    article_ids = encoder.encode(article, first=True)
    return encoder.bos + article_ids[:budget] + instruction, len(article_ids) > budget


def _records(records: Iterable[dict], columns: Iterable[str] | None, source: str, skip_invalid: bool
             ) -> list[dict[str, str]]:
    """Checked ``{"article", "highlights"}`` examples; columns are taken from the first record if not given."""
    if columns is None:
        records = list(records)
        columns = records[0].keys() if records else ()
    return to_examples(records, columns, source, skip_invalid=skip_invalid, formats=(SUMMARIZATION_FORMAT,))


def render_summarization_records(
    records: Iterable[dict],
    columns: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    max_seq_length: int = 512,
    max_source_length: int = 384,
    train_on_inputs: bool = False,
    skip_invalid: bool = False,
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """Tokenize ``article``/``highlights`` records into training samples.

    Args:
        records: Raw records.
        columns: Their column names.
        tokenizer: Must have an EOS token.
        source: File or dataset name, for messages.
        max_seq_length: Maximum tokens per sample, EOS included.
        max_source_length: Maximum prompt tokens (BOS, article, instruction).
        train_on_inputs: Supervise the prompt too.
        skip_invalid: Drop bad records (reported) instead of raising.

    Returns:
        ``{"input_ids", "labels"}`` lists and the rendering statistics.

    Raises:
        DataFormatError: for bad records, a tokenizer without EOS, or when nothing fits.
        ConfigError: when ``max_source_length`` cannot hold the instruction.
    """
    examples = _records(records, columns, source, skip_invalid)
    encoder = PieceEncoder(tokenizer)
    if encoder.eos is None:
        raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
    stats, articles_cut = RenderStats(), 0
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for index, example in enumerate(examples):
        encoder.clear()
        prompt, cut = summary_prompt_ids(encoder, example["article"], max_source_length)
        articles_cut += cut
        room = max_seq_length - len(prompt) - 1
        if room < 1:
            stats.dropped_long_prompt += 1
            stats.dropped_indices.append(index)
            continue
        target = encoder.encode(example["highlights"], first=False)
        stats.truncated += len(target) > room
        target = target[:room] + [encoder.eos]
        masked = 1 if train_on_inputs else len(prompt)
        out["input_ids"].append(prompt + target)
        out["labels"].append([IGNORE_INDEX] * masked + (prompt + target)[masked:])
        stats.kept += 1
        stats.tokens += len(prompt) + len(target)
        stats.supervised_tokens += len(prompt) + len(target) - masked
    if articles_cut:
        logger.info("%s: %d of %d articles cut to fit --max_source_length %d.",
                    source, articles_cut, len(examples), max_source_length)
    if not stats.kept:
        raise DataFormatError(
            f"{source}: every prompt fills --max_seq_length {max_seq_length}; make --max_source_length "
            "smaller than --max_seq_length."
        )
    return out, stats


def summarization_prompts(
    records: Iterable[dict], tokenizer: PreTrainedTokenizerBase, max_source_length: int, *, source: str = "eval"
) -> list[str]:
    """The training prompts as text (without BOS, which the tokenizer adds), for ROUGE generation.

    The article is cut at the end of its last token that fits, exactly as training cuts it,
    so ``tokenizer(prompt)`` reproduces the training prompt for byte-level BPE and
    SentencePiece tokenizers.

    Raises:
        DataFormatError: for bad records.
    """
    encoder = PieceEncoder(tokenizer)
    _, budget = _article_budget(encoder, max_source_length)
    prompts = []
    for example in _records(records, None, source, False):
        article = example["article"]
        if tokenizer.is_fast:
            encoded = tokenizer(article, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded["input_ids"]) > budget:
                article = article[: encoded["offset_mapping"][budget - 1][1]]
        else:  # slow tokenizers have no offsets: decode the kept tokens
            ids = tokenizer.encode(article, add_special_tokens=False)
            if len(ids) > budget:
                article = tokenizer.decode(ids[:budget])
        prompts.append(article + SUMMARIZE_INSTRUCTION)
    return prompts


def summarization_references(records: Iterable[dict], *, source: str = "eval") -> list[str]:
    """The untruncated ``highlights`` of each record, the ROUGE references.

    Raises:
        DataFormatError: for bad records.
    """
    return [example["highlights"] for example in _records(records, None, source, False)]
