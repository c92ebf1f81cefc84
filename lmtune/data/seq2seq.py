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

from transformers import PreTrainedTokenizerBase

from lmtune.data.chat import read_conversations, render_prompt
from lmtune.data.chat_format import PieceEncoder, resolve_chat_format
from lmtune.data.formats import INSTRUCTION_FORMATS, RecordFormat, to_examples
from lmtune.data.render import RenderStats
from lmtune.data.summarization import SUMMARIZATION_FORMAT, summarization_prompts
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


class _Builder:
    """Collects (source ids, target text) pairs into samples and counts what it drops or cuts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int):
        if tokenizer.eos_token_id is None:
            raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
        if max_target_length < 2:
            raise ConfigError(f"--max_target_length must be >= 2 for seq2seq (got {max_target_length}): "
                              "at least one target token and EOS.")
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.stats = RenderStats()
        self.out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}

    def drop(self, index: int) -> None:
        self.stats.dropped_long_prompt += 1
        self.stats.dropped_indices.append(index)

    def add(self, index: int, source_ids: list[int], target: str) -> None:
        if len(source_ids) > self.max_source_length:
            self.drop(index)
            return
        target_ids = self.tokenizer.encode(target, add_special_tokens=False)
        if target_ids and target_ids[-1] == self.eos:
            target_ids = target_ids[:-1]
        room = self.max_target_length - 1
        if len(target_ids) > room:
            self.stats.note_truncation(len(target_ids) - room)
            target_ids = target_ids[:room]
        labels = target_ids + [self.eos]
        self.out["input_ids"].append(list(source_ids))
        self.out["labels"].append(labels)
        self.stats.kept += 1
        self.stats.tokens += len(source_ids) + len(labels)
        self.stats.supervised_tokens += len(labels)

    def finish(self, source: str) -> tuple[dict[str, list[list[int]]], RenderStats]:
        if self.stats.dropped_long_prompt:
            logger.warning(
                "%s: %d sample(s) dropped: the source is longer than --max_source_length %d (first: record %d). "
                "Raise --max_source_length or shorten those inputs.", source, self.stats.dropped_long_prompt,
                self.max_source_length, self.stats.dropped_indices[0],
            )
        if not self.stats.kept:
            raise DataFormatError(f"{source}: every source is longer than --max_source_length "
                                  f"{self.max_source_length}; nothing left to train on. Raise it.")
        return self.out, self.stats


def _instructions(builder: _Builder, records: Iterable[dict], columns: Iterable[str], source: str,
                  skip_invalid: bool) -> None:
    examples = to_examples(records, columns, source, skip_invalid=skip_invalid, formats=SEQ2SEQ_FORMATS)
    encoded = builder.tokenizer([ex["prompt"] for ex in examples]).input_ids
    for index, (example, ids) in enumerate(zip(examples, encoded)):
        builder.add(index, ids, example["response"])


def _summaries(builder: _Builder, records: Iterable[dict], columns: Iterable[str], source: str,
               skip_invalid: bool) -> None:
    examples = to_examples(records, columns, source, skip_invalid=skip_invalid, formats=(SUMMARIZATION_FORMAT,))
    budget = summary_source_budget(builder.tokenizer, builder.max_source_length)
    prompts = summarization_prompts(examples, builder.tokenizer, budget, source=source)
    # Cutting the article text can re-tokenize one token longer; truncation then trims the tail.
    encoded = builder.tokenizer(prompts, truncation=True, max_length=builder.max_source_length).input_ids
    for index, (example, ids) in enumerate(zip(examples, encoded)):
        builder.add(index, ids, example["highlights"])


def _conversations(builder: _Builder, records: Iterable[dict], columns: Iterable[str], source: str,
                   skip_invalid: bool, chat_template: str | None) -> None:
    chat_format = resolve_chat_format(chat_template, builder.tokenizer)
    encoder = PieceEncoder(builder.tokenizer)
    for index, messages in read_conversations(records, columns, source, skip_invalid=skip_invalid):
        encoder.clear()
        try:
            ids = render_prompt(builder.tokenizer, messages[:-1], chat_format,
                                max_prompt_tokens=builder.max_source_length, encoder=encoder)
        except DataFormatError:  # the last user turn alone is too long: counted like any long source
            builder.drop(index)
            continue
        builder.add(index, ids, messages[-1]["content"])


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
    if task not in SEQ2SEQ_TASKS:
        raise ConfigError(f"--task {task} is not supported for seq2seq models; choose one of "
                          f"{', '.join(SEQ2SEQ_TASKS)}.")
    builder = _Builder(tokenizer, max_source_length, max_target_length)
    if task == "chat":
        _conversations(builder, records, columns, source, skip_invalid, chat_template)
    elif task == "summarization":
        _summaries(builder, records, columns, source, skip_invalid)
    else:
        _instructions(builder, records, columns, source, skip_invalid)
    return builder.finish(source)


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
