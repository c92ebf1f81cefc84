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

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.chat_format import PieceEncoder
from lmtune.data.formats import RecordFormat, check_records, detect_format, to_examples
from lmtune.data.pipeline import RowFormat, render_records
from lmtune.data.render import ANSWER, END, PROMPT, RenderStats, Segment, require_eos
from lmtune.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

SUMMARIZE_INSTRUCTION = "\nSummarize the highlights of this article.\n"
SUMMARIZATION_FORMAT = RecordFormat(
    "article-highlights", ("article", "highlights"), (),
    lambda record: {"article": record["article"], "highlights": record["highlights"]},
)


def article_budget(encoder: PieceEncoder, max_source_length: int) -> tuple[list[int], int]:
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
    instruction, budget = article_budget(encoder, max_source_length)
    article_ids = encoder.encode(article, first=True)
    return encoder.bos + article_ids[:budget] + instruction, len(article_ids) > budget


def _records(records: Iterable[dict], columns: Iterable[str] | None, source: str, skip_invalid: bool
             ) -> list[dict[str, str]]:
    """Checked ``{"article", "highlights"}`` examples; columns are taken from the first record if not given."""
    if columns is None:
        records = list(records)
        columns = records[0].keys() if records else ()
    return to_examples(records, columns, source, skip_invalid=skip_invalid, formats=(SUMMARIZATION_FORMAT,))


class SummarySegments:
    """Record -> cut article + instruction (prompt), highlights, EOS; a class: it pickles to map workers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_source_length: int):
        self.encoder, self.max_source_length = PieceEncoder(tokenizer), max_source_length

    def __call__(self, record: dict, index: int) -> tuple[list[Segment], int]:
        encoder = self.encoder
        encoder.clear()
        prompt, cut = summary_prompt_ids(encoder, record["article"], self.max_source_length)
        return [(prompt, PROMPT), (encoder.encode(record["highlights"], first=False), ANSWER),
                ([encoder.eos], END)], int(cut)


def summarization_rows(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int = 512,
    max_source_length: int = 384, train_on_inputs: bool = False, skip_invalid: bool = False,
) -> RowFormat:
    """Check every record, then say how each becomes a sample (``render_summarization_records``).

    Raises:
        DataFormatError: for bad records or a tokenizer without EOS.
        ConfigError: when ``max_source_length`` cannot hold the instruction.
    """
    _, kept = check_records(dataset, dataset.column_names, source, skip_invalid=skip_invalid,
                            formats=(SUMMARIZATION_FORMAT,))
    require_eos(tokenizer)
    article_budget(PieceEncoder(tokenizer), max_source_length)  # a bad limit fails here, not in a worker

    def finish(stats: RenderStats, articles_cut: list[int]) -> None:
        if any(articles_cut):
            logger.info("%s: %d of %d articles cut to fit --max_source_length %d.",
                        source, sum(articles_cut), len(kept), max_source_length)
        if not stats.kept:
            raise DataFormatError(
                f"{source}: every prompt fills --max_seq_length {max_seq_length}; make --max_source_length "
                "smaller than --max_seq_length."
            )

    return RowFormat(kept, SummarySegments(tokenizer, max_source_length),
                     key={"task": "summarization", "max_source_length": max_source_length},
                     max_length=max_seq_length, train_on_inputs=train_on_inputs, finish=finish)


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
    detect_format(columns, source, (SUMMARIZATION_FORMAT,))
    return render_records(records, lambda dataset: summarization_rows(
        dataset, source, tokenizer, max_seq_length=max_seq_length, max_source_length=max_source_length,
        train_on_inputs=train_on_inputs, skip_invalid=skip_invalid,
    ), tokenizer)


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
    _, budget = article_budget(PieceEncoder(tokenizer), max_source_length)
    return [summary_prompt_text(tokenizer, example["article"], budget)
            for example in _records(records, None, source, False)]


def summary_prompt_text(tokenizer: PreTrainedTokenizerBase, article: str, budget: int) -> str:
    """One article cut to ``budget`` tokens at the end of its last whole token, plus the instruction."""
    if tokenizer.is_fast:
        encoded = tokenizer(article, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) > budget:
            article = article[: encoded["offset_mapping"][budget - 1][1]]
    else:  # slow tokenizers have no offsets: decode the kept tokens
        ids = tokenizer.encode(article, add_special_tokens=False)
        if len(ids) > budget:
            article = tokenizer.decode(ids[:budget])
    return article + SUMMARIZE_INSTRUCTION


def summarization_references(records: Iterable[dict], *, source: str = "eval") -> list[str]:
    """The untruncated ``highlights`` of each record, the ROUGE references.

    Raises:
        DataFormatError: for bad records.
    """
    return [example["highlights"] for example in _records(records, None, source, False)]
