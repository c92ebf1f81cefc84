"""Seq2seq data (T5/FLAN-T5, BART): records -> encoder ``input_ids`` + decoder ``labels``.

Stage contract (the encoder-decoder counterpart of render.py): each sample is the source
text tokenized as the encoder input (the tokenizer's own special tokens, e.g. T5's final
``</s>``, exactly as ``generate_batched`` tokenizes prompts at evaluation) and the target
tokenized as ``labels`` ending in EOS. Nothing is masked inside either sequence: the
encoder input is never predicted and every label is. Padding (pad id for inputs, -100 for
labels) and ``decoder_input_ids`` (the model's ``decoder_start_token_id``, then the
labels shifted right) are the collator's and the model's business. T5's own pad token is
kept; the reference replaced it with EOS.

Per task:

- completion / code-generation: the reference's ``ALPACA_PROMPT_DICT``, which ends in
  ``### Response:`` with no trailing newline, over the ``.strip()``-ed fields; target =
  ``output``. Other instruction schemas use their prompt without trailing whitespace.
- chat: the conversation up to the last user turn rendered by ``lmtune.data.chat.render_prompt``
  (what ``lmtune chat`` feeds a seq2seq model), target = the last assistant turn.
- summarization: ``article`` cut to fit + ``"\\nSummarize the highlights of this article.\\n"``
  (``summarization_prompts``, the same text ROUGE generation uses), target = ``highlights``.

A source longer than ``max_source_length`` is dropped and counted (a cut-off prompt loses
its ``### Response:`` cue); targets are cut to ``max_target_length`` with EOS kept.
Packing (``--dataset_concatenation``) does not apply: an encoder attends both ways, so
packed samples would see each other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.chat import (
    conversation_from_record,
    detect_chat_schema,
    read_conversations,
    render_prompt,
)
from lmtune.data.chat_format import PieceEncoder, resolve_chat_format
from lmtune.data.formats import INSTRUCTION_FORMATS, RecordFormat, check_records
from lmtune.data.pipeline import RowFormat, render_records
from lmtune.data.render import ANSWER, END, PROMPT, RenderStats, Segment, require_eos
from lmtune.data.sources import record_location
from lmtune.data.summarization import (
    SUMMARIZATION_FORMAT,
    article_budget,
    summary_prompt_text,
)
from lmtune.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

# The reference's ALPACA_PROMPT_DICT (finetune_seq2seq): no newline after "### Response:".
SEQ2SEQ_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
SEQ2SEQ_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
SEQ2SEQ_TASKS = ("completion", "code-generation", "chat", "summarization")


def seq2seq_alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The reference's seq2seq Alpaca prompt over stripped fields, ending in ``### Response:``."""
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    if input_text:
        return SEQ2SEQ_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return SEQ2SEQ_PROMPT_NO_INPUT.format(instruction=instruction)


def _alpaca(record: dict) -> dict[str, str]:
    return {"prompt": seq2seq_alpaca_prompt(record["instruction"], record.get("input")),
            "response": record["output"].strip()}


def _without_trailing_space(fmt: RecordFormat) -> RecordFormat:
    def to_example(record: dict) -> dict[str, str]:
        example = fmt.to_example(record)
        return {"prompt": example["prompt"].rstrip(), "response": example["response"]}

    return dataclasses.replace(fmt, to_example=to_example)


# The causal formats, except that Alpaca uses the seq2seq prompt and plain text (nothing to
# condition on) is not a seq2seq format.
SEQ2SEQ_FORMATS: tuple[RecordFormat, ...] = tuple(
    dataclasses.replace(fmt, to_example=_alpaca) if fmt.name == "alpaca" else _without_trailing_space(fmt)
    for fmt in INSTRUCTION_FORMATS if fmt.name != "text"
)


def _special_tokens_after(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer appends to a text (1 for T5's ``</s>``)."""
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    start = ids.index(plain[0]) if plain and plain[0] in ids else 0
    return len(ids) - start - len(plain)


def summary_source_budget(tokenizer: PreTrainedTokenizerBase, max_source_length: int) -> int:
    """The ``max_source_length`` to give ``summarization_prompts`` so that the prompt text, tokenized
    with the special tokens an encoder input gets (T5 appends ``</s>``), fits ``max_source_length``."""
    return max_source_length - _special_tokens_after(tokenizer)


class _Targets:
    """The labels side of every seq2seq sample: target text without special tokens, then EOS."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer, self.eos = tokenizer, require_eos(tokenizer)

    def segments(self, source: str | list[int], target: str) -> list[Segment]:
        ids = self.tokenizer.encode(target, add_special_tokens=False)
        if ids and ids[-1] == self.eos:
            ids = ids[:-1]
        return [(source, PROMPT), (ids, ANSWER), ([self.eos], END)]


class _InstructionSegments(_Targets):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, to_example):
        super().__init__(tokenizer)
        self.to_example = to_example

    def __call__(self, record: dict, index: int) -> tuple[list[Segment], int]:
        example = self.to_example(record)
        return self.segments(example["prompt"], example["response"]), 0


class _SummarySegments(_Targets):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_source_length: int):
        super().__init__(tokenizer)
        self.max_source_length = max_source_length
        # The article's share of the prompt budget left by the special tokens (a limit without room fails here).
        _, self.article_tokens = article_budget(PieceEncoder(tokenizer), summary_source_budget(tokenizer, max_source_length))

    def __call__(self, record: dict, index: int) -> tuple[list[Segment], int]:
        prompt = summary_prompt_text(self.tokenizer, record["article"], self.article_tokens)
        # Cutting the article text can re-tokenize one token longer; truncation then trims the tail.
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_source_length).input_ids
        return self.segments(ids, record["highlights"]), 0


class _ConversationSegments(_Targets):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format, schema: str, source: str,
                 max_source_length: int):
        super().__init__(tokenizer)
        self.chat_format, self.schema, self.source, self.max_source_length = chat_format, schema, source, max_source_length

    def __call__(self, record: dict, index: int) -> tuple[list[Segment] | None, int]:
        messages = conversation_from_record(record, self.schema, f"{self.source}: {record_location(record, index)}")
        try:
            ids = render_prompt(self.tokenizer, messages[:-1], self.chat_format,
                                max_prompt_tokens=self.max_source_length)
        except DataFormatError:  # the last user turn alone is too long: counted like any long source
            return None, 0
        return self.segments(ids, messages[-1]["content"]), 0


def _row_format(dataset, task: str, source: str, tokenizer: PreTrainedTokenizerBase, max_source_length: int,
                chat_template: str | None, skip_invalid: bool):
    """The kept records and their segment function, per task."""
    if task == "chat":
        chat_format = resolve_chat_format(chat_template, tokenizer)
        schema = detect_chat_schema(dataset.column_names, source)
        kept = [index for index, _ in read_conversations(dataset, dataset.column_names, source,
                                                          skip_invalid=skip_invalid)]
        segments = _ConversationSegments(tokenizer, chat_format, schema, source, max_source_length)
        return kept, segments, {"schema": schema, "format": chat_format.name, "template": chat_format.template}
    formats = (SUMMARIZATION_FORMAT,) if task == "summarization" else SEQ2SEQ_FORMATS
    fmt, kept = check_records(dataset, dataset.column_names, source, skip_invalid=skip_invalid, formats=formats)
    if task == "summarization":
        return kept, _SummarySegments(tokenizer, max_source_length), {}
    return kept, _InstructionSegments(tokenizer, fmt.to_example), {"format": fmt.name}


def seq2seq_rows(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, *, task: str,
    max_source_length: int = 384, max_target_length: int = 128, chat_template: str | None = None,
    skip_invalid: bool = False,
) -> RowFormat:
    """Check every record, then say how each becomes an encoder input and labels (``render_seq2seq_records``).

    Raises:
        ConfigError: for an unknown task, ``max_target_length`` < 2 or an unusable chat template.
        DataFormatError: for bad records or a tokenizer without EOS.
    """
    if task not in SEQ2SEQ_TASKS:
        raise ConfigError(f"--task {task} is not supported for seq2seq models; choose one of "
                          f"{', '.join(SEQ2SEQ_TASKS)}.")
    require_eos(tokenizer)
    if max_target_length < 2:
        raise ConfigError(f"--max_target_length must be >= 2 for seq2seq (got {max_target_length}): "
                          "at least one target token and EOS.")
    kept, segments, key = _row_format(dataset, task, source, tokenizer, max_source_length, chat_template,
                                      skip_invalid)

    def finish(stats: RenderStats, _: list[int]) -> None:
        if stats.dropped_long_prompt:
            logger.warning(
                "%s: %d sample(s) dropped: the source is longer than --max_source_length %d (first: record %d). "
                "Raise --max_source_length or shorten those inputs.", source, stats.dropped_long_prompt,
                max_source_length, stats.dropped_indices[0],
            )
        if not stats.kept:
            raise DataFormatError(f"{source}: every source is longer than --max_source_length "
                                  f"{max_source_length}; nothing left to train on. Raise it.")

    return RowFormat(kept, segments, key={"task": f"seq2seq-{task}", **key}, max_length=max_target_length,
                     max_prompt_length=max_source_length, seq2seq=True, finish=finish)


def render_seq2seq_records(
    records: Iterable[dict],
    columns: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    source: str,
    max_source_length: int = 384,
    max_target_length: int = 128,
    chat_template: str | None = None,
    skip_invalid: bool = False,
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """Tokenize records of one split into encoder inputs and decoder labels.

    Args:
        records: Raw records.
        columns: Their column names (the record schema is recognized from them).
        tokenizer: The model's tokenizer; must have an EOS token.
        task: ``completion``, ``code-generation``, ``chat`` or ``summarization``.
        source: File or dataset name, for messages.
        max_source_length: Most encoder tokens, special tokens included.
        max_target_length: Most label tokens, EOS included.
        chat_template: For ``chat``: ``neural-chat`` (default), ``tokenizer`` or a Jinja file.
        skip_invalid: Drop bad records (reported) instead of raising.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` and the rendering statistics.

    Raises:
        ConfigError: for an unknown task, ``max_target_length`` < 2 or an unusable chat template.
        DataFormatError: for bad records, a tokenizer without EOS, or when no source fits.
    """
    return render_records(records, lambda dataset: seq2seq_rows(
        dataset, source, tokenizer, task=task, max_source_length=max_source_length,
        max_target_length=max_target_length, chat_template=chat_template, skip_invalid=skip_invalid,
    ), tokenizer)


def check_seq2seq_packing(dataset_concatenation: bool) -> None:
    """Packing does not apply to encoder-decoder models.

    Raises:
        ConfigError: when ``--dataset_concatenation`` is asked for.
    """
    if dataset_concatenation:
        raise ConfigError(
            "--dataset_concatenation does not apply to seq2seq (encoder-decoder) models: the encoder attends "
            "in both directions, so samples packed into one row would see each other, and each sample has its "
            "own target. Drop --dataset_concatenation; batches are padded per batch instead."
        )
