"""Preference pairs: records -> (prompt, chosen, rejected) -> two masked samples per pair.

Contract: ``render_preference_records`` recognizes a record format by its fields, checks every
record (file, record/line, field named) before anything is tokenized, and returns one row per
pair with ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``:
prompt + answer + end of turn, the prompt ``IGNORE_INDEX`` in the labels. Records are handled
one at a time, so a pair can never come apart (the reference built prompts, chosen and
rejected answers with *set* comprehensions, which de-duplicated and reordered each batch).

Formats:

- ``system``/``question``/``chosen``/``rejected`` (Intel/orca_dpo_pairs, the reference's):
  prompt = system + question, joined as the reference joined them (no separator, no template),
  so an adapter trained here sees the reference's prompts.
- ``prompt``/``chosen``/``rejected`` as text.
- message lists: ``chosen`` and ``rejected`` as whole conversations that differ only in their
  last (assistant) message, or ``prompt`` as messages and ``chosen``/``rejected`` as the
  assistant message(s) that follow. Rendered with the run's chat format (``--chat_template``)
  by ``chat_pieces``, the renderer SFT chat data and ``lmtune chat`` use.

Text pairs are tokenized by ``render_examples``, the tokenize-and-mask step of SFT data. A
prompt longer than ``max_prompt_length`` keeps its end (where the question is) and its BOS; an
answer that does not fit in ``max_length`` is cut, keeping its end-of-turn tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.chat import conversation_problem
from lmtune.data.chat_format import ANSWER, END, Message, PieceEncoder, chat_pieces, resolve_chat_format
from lmtune.data.render import IGNORE_INDEX, render_examples
from lmtune.data.sources import (
    LOCATION_COLUMN,
    PROBLEM_COLUMN,
    SKIP_HINT,
    describe_value,
    load_splits,
    record_location,
    report_skipped,
    source_problem,
)
from lmtune.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

ORCA, TEXT, MESSAGES = "system/question/chosen/rejected", "prompt/chosen/rejected", "messages"
FORMAT_HELP = (
    "system (optional), question, chosen, rejected as text (Intel/orca_dpo_pairs); prompt, chosen, rejected as "
    "text; or chosen and rejected as lists of {role, content} messages (with or without a prompt message list)"
)
# Long enough that render_examples never truncates: truncation here keeps the prompt's end.
_NO_LIMIT = 1 << 30


@dataclass
class PreferenceStats:
    """What reading and rendering did to the pairs; reported by ``--dry_run``."""

    format: str = ""
    records: int = 0
    pairs: int = 0
    skipped: int = 0
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    longest: int = 0

    def describe(self) -> str:
        return (f"{self.pairs} pairs ({self.format}), {self.tokens} tokens, {self.prompts_truncated} prompts "
                f"truncated (end kept), {self.chosen_truncated} chosen and {self.rejected_truncated} rejected "
                f"answers cut")


@dataclass(frozen=True)
class Pair:
    """One checked record: its location, the prompt, and the two answers (text or messages)."""

    where: str
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]


class _BadPair(Exception):
    """One unusable record; raised or collected by ``read_pairs``."""


def detect_preference_format(columns: Iterable[str], first: dict, source: str) -> str:
    """The pair format, from the column names (and whether ``chosen`` holds text or messages).

    Raises:
        DataFormatError: naming the fields found and the formats accepted.
    """
    present = set(columns) - {LOCATION_COLUMN, PROBLEM_COLUMN}
    if {"chosen", "rejected"} <= present:
        if isinstance(first.get("chosen"), list):
            return MESSAGES
        if "question" in present:
            return ORCA
        if "prompt" in present:
            return TEXT
    missing = sorted({"chosen", "rejected"} - present) or ["prompt (or question)"]
    raise DataFormatError(
        f"{source}: the records have fields {sorted(present)}, which are not preference pairs (missing "
        f"{', '.join(missing)}). Expected: {FORMAT_HELP}. Fix: rename the fields."
    )


def _text(record: dict, name: str, where: str, *, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if value is None:
        raise _BadPair(f"{where}: field '{name}' is missing (or null); expected a string")
    if not isinstance(value, str):
        raise _BadPair(f"{where}: field '{name}' is {describe_value(value)}; expected a string")
    return value


def _messages(record: dict, name: str, where: str) -> list[Message]:
    raw = record.get(name)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _BadPair(f"{where}: field '{name}' is {describe_value(raw)}; expected a list of {{role, content}}")
    messages = []
    for number, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str) \
                or not isinstance(item.get("content"), str):
            raise _BadPair(f"{where}: field '{name}', message {number} is {describe_value(item)}; expected "
                           "{\"role\": string, \"content\": string}")
        messages.append({"role": item["role"], "content": item["content"]})
    return messages


def _message_pair(record: dict, where: str) -> Pair:
    """Message-list pairs: both conversations must share everything but their last answer."""
    prompt = _messages(record, "prompt", where) if isinstance(record.get("prompt"), list) else []
    chosen = prompt + _messages(record, "chosen", where)
    rejected = prompt + _messages(record, "rejected", where)
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        problem = conversation_problem(conversation, f"{where}: field '{name}'")
        if problem is not None:
            raise _BadPair(problem)
    if chosen[:-1] != rejected[:-1]:
        at = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) if len(chosen) == len(rejected) \
            else min(len(chosen), len(rejected)) - 1
        raise _BadPair(f"{where}: fields 'chosen' and 'rejected' differ at message {at}, before their last "
                       "message; a pair answers the same conversation")
    return Pair(where, chosen[:-1], [chosen[-1]], [rejected[-1]])


def _read_pair(record: dict, fmt: str, where: str) -> Pair:
    """Check one record and return its pair.

    Raises:
        _BadPair: naming ``where`` and the field.
    """
    if fmt == MESSAGES:
        pair = _message_pair(record, where)
        chosen, rejected = pair.chosen[-1]["content"], pair.rejected[-1]["content"]
    else:
        if fmt == ORCA:  # the reference's prompt: system + question, nothing between, no template
            prompt = _text(record, "system", where, optional=True) + _text(record, "question", where)
            prompt_field = "question"
        else:
            prompt, prompt_field = _text(record, "prompt", where), "prompt"
        if not prompt.strip():
            raise _BadPair(f"{where}: field '{prompt_field}' is empty; expected the prompt both answers answer")
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        pair = Pair(where, prompt, chosen, rejected)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise _BadPair(f"{where}: field '{name}' is empty; expected an answer")
    if chosen.strip() == rejected.strip():
        raise _BadPair(f"{where}: fields 'chosen' and 'rejected' hold the same answer; a pair needs two different "
                       "answers to prefer one")
    return pair


def read_pairs(records: Iterable[dict], columns: Iterable[str], source: str, *, skip_invalid: bool = False
               ) -> tuple[str, list[Pair], int]:
    """Check every record and turn it into a ``Pair``, in order, duplicates and all.

    Returns:
        The format name, the usable pairs and the number of records read.

    Raises:
        DataFormatError: on the first bad record (file, record/line and field named), or when
            skipping would drop more than ``MAX_INVALID_SHARE`` of the records, or when none is left.
    """
    records = list(records)
    if not records:
        raise DataFormatError(f"{source}: holds no records.")
    fmt = detect_preference_format(columns, records[0], source)
    pairs, problems = [], []
    for index, record in enumerate(records):
        try:
            problem = source_problem(record)
            if problem is not None:
                raise _BadPair(problem)
            pairs.append(_read_pair(record, fmt, f"{source}: {record_location(record, index)}"))
        except _BadPair as bad:
            if not skip_invalid:
                raise DataFormatError(f"{bad}. Fix: correct the record, {SKIP_HINT}.") from None
            problems.append(str(bad))
    report_skipped(source, problems, len(records))
    if not pairs:
        raise DataFormatError(f"{source}: no usable preference pairs.")
    return fmt, pairs, len(records)


def _text_sequences(tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str]
                    ) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, answer ids + EOS, 1) for text pairs, through SFT's tokenize-and-mask step."""
    examples = [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
    rendered, _ = render_examples(tokenizer, examples, max_seq_length=_NO_LIMIT)
    out = []
    for ids, labels in zip(rendered["input_ids"], rendered["labels"]):
        masked = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        out.append((ids[:masked], ids[masked:], 1))
    return out


def _chat_sequence(encoder: PieceEncoder, conversation: list[Message], chat_format
                   ) -> tuple[list[int], list[int], int]:
    """(prompt ids, last answer + its end-of-turn ids, their number) of a conversation in the run's chat format."""
    pieces = chat_pieces(encoder, conversation, chat_format)
    last = max(i for i, (_, kind) in enumerate(pieces) if kind == ANSWER)
    prompt = [token for ids, _ in pieces[:last] for token in ids]
    answer, end = list(pieces[last][0]), []
    if last + 1 < len(pieces) and pieces[last + 1][1] == END:
        end = list(pieces[last + 1][0])
    return prompt, answer + end, len(end)


@dataclass(frozen=True)
class Limits:
    max_prompt_length: int
    max_length: int
    bos: int | None


def fit_sequence(prompt: list[int], answer: list[int], end: int, limits: Limits) -> tuple[list[int], list[int], bool, bool]:
    """Truncate one prompt + answer: the prompt keeps its BOS and its end, the answer its ``end`` last tokens.

    Returns:
        ``(input_ids, labels, prompt_cut, answer_cut)``.
    """
    prompt_cut = len(prompt) > limits.max_prompt_length
    if prompt_cut:
        keep_bos = limits.bos is not None and prompt[:1] == [limits.bos]
        prompt = prompt[:1] * keep_bos + prompt[len(prompt) - (limits.max_prompt_length - keep_bos):]
    room = limits.max_length - len(prompt)
    answer_cut = len(answer) > room
    if answer_cut:
        end = min(end, room - 1)
        answer = answer[: room - end] + answer[len(answer) - end:]
    labels = [IGNORE_INDEX] * len(prompt) + answer
    if not prompt:  # nothing predicts the first token
        labels[0] = IGNORE_INDEX
    return prompt + answer, labels, prompt_cut, answer_cut


def render_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], fmt: str, *, max_prompt_length: int,
                 max_length: int, chat_template: str | None = None) -> tuple[dict[str, list[list[int]]], PreferenceStats]:
    """Tokenize checked pairs into chosen and rejected samples (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
    if fmt == MESSAGES:
        encoder, chat_format = PieceEncoder(tokenizer), resolve_chat_format(chat_template, tokenizer)
        chosen = [_chat_sequence(encoder, p.prompt + p.chosen, chat_format) for p in pairs]
        rejected = [_chat_sequence(encoder, p.prompt + p.rejected, chat_format) for p in pairs]
    else:
        prompts = [p.prompt for p in pairs]
        chosen = _text_sequences(tokenizer, prompts, [p.chosen for p in pairs])
        rejected = _text_sequences(tokenizer, prompts, [p.rejected for p in pairs])
    limits = Limits(max_prompt_length, max_length, tokenizer.bos_token_id)
    stats = PreferenceStats(format=fmt, pairs=len(pairs))
    out: dict[str, list[list[int]]] = {key: [] for key in
                                       ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    for (c_prompt, c_answer, c_end), (r_prompt, r_answer, r_end) in zip(chosen, rejected):
        c_ids, c_labels, c_pcut, c_cut = fit_sequence(c_prompt, c_answer, c_end, limits)
        r_ids, r_labels, r_pcut, r_cut = fit_sequence(r_prompt, r_answer, r_end, limits)
        out["chosen_input_ids"].append(c_ids)
        out["chosen_labels"].append(c_labels)
        out["rejected_input_ids"].append(r_ids)
        out["rejected_labels"].append(r_labels)
        stats.prompts_truncated += c_pcut or r_pcut
        stats.chosen_truncated += c_cut
        stats.rejected_truncated += r_cut
        stats.tokens += len(c_ids) + len(r_ids)
        stats.supervised_tokens += sum(label != IGNORE_INDEX for label in c_labels + r_labels)
        stats.longest = max(stats.longest, len(c_ids), len(r_ids))
    return out, stats



def render_preference_records(
    records: Iterable[dict], columns: Iterable[str], tokenizer: PreTrainedTokenizerBase, *, source: str,
    max_prompt_length: int, max_length: int, chat_template: str | None = None, skip_invalid: bool = False,
) -> tuple[dict[str, list[list[int]]], PreferenceStats]:
    """Read, check and tokenize one split of preference records.

    Raises:
        DataFormatError: for an unrecognized format or a bad record (file, record and field named).
    """
    fmt, pairs, total = read_pairs(records, columns, source, skip_invalid=skip_invalid)
    samples, stats = render_pairs(tokenizer, pairs, fmt, max_prompt_length=max_prompt_length,
                                  max_length=max_length, chat_template=chat_template)
    stats.records, stats.skipped = total, total - len(pairs)
    logger.info("%s: %s.", source, stats.describe())
    return samples, stats


@dataclass
class PreparedPairs:
    train: datasets.Dataset | None = None
    validation: datasets.Dataset | None = None
    stats: dict[str, PreferenceStats] = field(default_factory=dict)


def prepare_preference_data(
    tokenizer: PreTrainedTokenizerBase, *, max_prompt_length: int, max_length: int, need_train: bool = True,
    need_validation: bool = False, chat_template: str | None = None, skip_invalid: bool = False,
    max_train_samples: int | None = None, max_eval_samples: int | None = None, **sources: Any,
) -> PreparedPairs:
    """Load (``sources``: the keyword arguments of ``load_splits``), check and tokenize both splits.

    Raises:
        ConfigError: when validation is needed but there is none.
        DataFormatError: for any unreadable file or bad record.
    """
    splits = load_splits(skip_invalid=skip_invalid, **sources)
    if need_validation and "validation" not in splits:
        raise ConfigError("--do_eval needs held-out pairs: pass --validation_file, or --validation_split_percentage "
                          "N to hold out N% of the training pairs.")
    names = {"train": sources.get("dataset_name") or sources.get("train_file") or "",
             "validation": sources.get("validation_file") or sources.get("dataset_name") or sources.get("train_file")}
    limits = {"train": max_train_samples, "validation": max_eval_samples}
    prepared = PreparedPairs()
    for split, needed in (("train", need_train), ("validation", need_validation)):
        if not needed or split not in splits:
            continue
        records = splits[split]
        if limits[split]:
            records = records.select(range(min(limits[split], len(records))))
        samples, prepared.stats[split] = render_preference_records(
            records, records.column_names, tokenizer, source=names[split] or split,
            max_prompt_length=max_prompt_length, max_length=max_length, chat_template=chat_template,
            skip_invalid=skip_invalid,
        )
        setattr(prepared, split, datasets.Dataset.from_dict(samples))
    return prepared
