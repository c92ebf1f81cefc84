"""Chat data: conversations -> token ids, rendered the same way for training and for ``lmtune chat``.

Stage contract (the chat counterpart of formats.py + render.py):

- ``read_conversations`` reads records in the ``messages`` schema (role/content, as
  HuggingFaceH4/ultrachat_200k), the ShareGPT ``conversations`` schema (from/value, as
  Open-Orca/SlimOrca) or the Intel/orca_dpo_pairs schema (system/question/chosen), and checks
  every conversation before anything is tokenized. Every record-level message names the file and
  the record's place in it (``record 4 (line 5)`` for JSON Lines, as stage 1 recorded it in
  ``LOCATION_COLUMN``), then the message index and field.
- ``chat_pieces`` (in ``lmtune.data.chat_format``) is the ONE renderer: training renders a whole
  conversation and supervises its assistant turns; ``lmtune chat`` renders the history with
  ``add_generation_prompt=True`` through ``render_prompt``. Token ids are concatenations of
  separately tokenized pieces and the EOS id, never the result of splitting text with regexes.
- ``render_chat_records`` makes one sample per conversation: every assistant turn (with its EOS)
  supervised, everything else ``IGNORE_INDEX``. A conversation that is too long loses its oldest
  whole user/assistant pairs first; the last user turn is never cut; if it and the start of its
  answer cannot fit, the sample is dropped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import datasets
from transformers import PreTrainedTokenizerBase

from lmtune.data.chat_format import (
    ANSWER,
    ChatFormat,
    EncodedPiece,
    Message,
    PieceEncoder,
    chat_pieces,
    resolve_chat_format,
)
from lmtune.data.pipeline import RowFormat, render_records
from lmtune.data.render import RenderStats, Segment
from lmtune.data.sources import (
    LOCATION_COLUMN,
    PROBLEM_COLUMN,
    SKIP_HINT,
    describe_value,
    record_location,
    report_skipped,
    source_problem,
)
from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (Open-Orca/SlimOrca, FastChat) -> roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
# The reference's SlimOrca task used this system prompt for conversations without one.
SLIMORCA_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."


class _BadRecord(Exception):
    """One unusable record; ``read_conversations`` raises or collects it."""


def detect_chat_schema(columns: Iterable[str], source: str) -> str:
    """Name the conversation schema of a data set from its columns.

    Raises:
        DataFormatError: naming the columns found and the schemas accepted.
    """
    present = set(columns) - {LOCATION_COLUMN, PROBLEM_COLUMN}  # stage 1's bookkeeping, not the user's fields
    if "messages" in present:
        return "messages"
    if "conversations" in present:
        return "conversations"
    if {"question", "chosen"} <= present:
        return "orca_dpo_pairs"
    raise DataFormatError(
        f"{source}: the records have fields {sorted(present)}, which match no chat schema. Accepted: "
        "messages (a list of {role, content}), conversations (a list of {from, value}, ShareGPT/SlimOrca), "
        "system + question + chosen (Intel/orca_dpo_pairs). For instruction records use --task completion."
    )


def _text_field(item: object, key: str, where: str) -> str:
    """``item[key]`` as a string, or ``_BadRecord`` worded like ``formats.check_record``'s messages."""
    if not isinstance(item, dict):
        raise _BadRecord(f"{where} is {describe_value(item)}; expected an object with '{key}'")
    value = item.get(key)
    if value is None:
        raise _BadRecord(f"{where}: field '{key}' is missing (or null); expected a string")
    if not isinstance(value, str):
        raise _BadRecord(f"{where}: field '{key}' is {describe_value(value)}; expected a string")
    return value


def _from_sharegpt(turns: object, where: str) -> list[Message]:
    if not isinstance(turns, list):
        got = "missing (or null)" if turns is None else describe_value(turns)
        raise _BadRecord(f"{where}: field 'conversations' is {got}; expected a list of {{from, value}}")
    messages = []
    for number, turn in enumerate(turns):
        speaker = _text_field(turn, "from", f"{where}: message {number}")
        if speaker not in SHAREGPT_ROLES:
            raise _BadRecord(
                f"{where}: message {number}: speaker '{speaker}' is not allowed; allowed: system, human, gpt"
            )
        content = _text_field(turn, "value", f"{where}: message {number}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    # SlimOrca (as the reference read it): a missing or empty system turn gets the default prompt.
    if messages and messages[0]["role"] == "system":
        if not messages[0]["content"].strip():
            messages[0] = {"role": "system", "content": SLIMORCA_SYSTEM_PROMPT}
    elif messages:
        messages.insert(0, {"role": "system", "content": SLIMORCA_SYSTEM_PROMPT})
    return messages


def conversation_from_record(record: dict, schema: str, where: str) -> list[Message]:
    """Turn one record into ``[{"role", "content"}, ...]`` (unchecked beyond field types).

    Args:
        record: The raw record.
        schema: ``messages``, ``conversations`` or ``orca_dpo_pairs`` (``detect_chat_schema``).
        where: ``"FILE: record N (line L)"``, the prefix of every message about this record.

    Raises:
        _BadRecord: naming ``where``, the message index and the field, when a field has the wrong type.
    """
    if schema == "conversations":
        return _from_sharegpt(record.get("conversations"), where)
    if schema == "orca_dpo_pairs":
        # One turn: the question answered by the preferred ("chosen") response.
        system = _text_field(record, "system", where) if record.get("system") is not None else ""
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return messages + [
            {"role": "user", "content": _text_field(record, "question", where)},
            {"role": "assistant", "content": _text_field(record, "chosen", where)},
        ]
    raw = record.get("messages")
    if not isinstance(raw, list):
        got = "missing (or null)" if raw is None else describe_value(raw)
        raise _BadRecord(f"{where}: field 'messages' is {got}; expected a list of {{role, content}}")
    messages = []
    for number, message in enumerate(raw):
        role = _text_field(message, "role", f"{where}: message {number}")
        messages.append({"role": role, "content": _text_field(message, "content", f"{where}: message {number}")})
    # An empty system message means "no system prompt": the chat format's default applies.
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    return messages


def conversation_problem(messages: list[Message], where: str, *, for_generation: bool = False) -> str | None:
    """What is wrong with a conversation, or None when it can be rendered.

    Roles must be system/user/assistant, a system message may only come first, and the
    other turns must alternate user, assistant, ... ending on an assistant turn (training)
    or a user turn (``for_generation``).
    """
    if not messages:
        return f"{where}: the conversation is empty"
    roles = [m["role"] for m in messages]
    listing = f"(roles: {', '.join(roles)})"
    offset = 1 if roles[0] == "system" else 0
    for number, (role, message) in enumerate(zip(roles, messages)):
        if role not in ROLES:
            return f"{where}: message {number}: role '{role}' is not allowed; allowed: {', '.join(ROLES)}"
        if role == "system" and number > 0:
            return f"{where}: message {number}: a system message must come first {listing}"
        if number >= offset:
            expected = "user" if (number - offset) % 2 == 0 else "assistant"
            if role != expected:
                return (
                    f"{where}: message {number}: expected role '{expected}' but found '{role}'; after an optional "
                    f"system message, turns must alternate user, assistant, user, ... {listing}"
                )
            if not message["content"].strip():
                return f"{where}: message {number}: the {role} message is empty"
    if len(roles) == offset:
        return f"{where}: the conversation has a system message but no user/assistant turns"
    last = "user" if for_generation else "assistant"
    if roles[-1] != last:
        why = "a user message to answer" if for_generation else "an assistant answer to learn from"
        return f"{where}: message {len(roles) - 1}: the conversation must end with {why} {listing}"
    return None


def read_conversations(
    records: Iterable[dict], columns: Iterable[str], source: str, *, skip_invalid: bool = False
) -> list[tuple[int, list[Message]]]:
    """Read and check every conversation before anything is tokenized.

    Returns:
        ``(record index, messages)`` for each usable record, in order.

    Raises:
        DataFormatError: on the first bad record (file, record/line and message index named), or
            when skipping would drop more than ``MAX_INVALID_SHARE`` of the records.
    """
    located = read_located_conversations(records, columns, source, skip_invalid=skip_invalid)
    return [(index, messages) for index, _, messages in located]


def read_located_conversations(
    records: Iterable[dict], columns: Iterable[str], source: str, *, skip_invalid: bool = False
) -> list[tuple[int, str, list[Message]]]:
    """``read_conversations``, with each record's place in its source (``record 4 (line 5)``).

    Raises:
        DataFormatError: as ``read_conversations``.
    """
    schema = detect_chat_schema(columns, source)
    conversations, problems, total = [], [], 0
    for index, record in enumerate(records):
        total += 1
        location = record_location(record, index)  # "record 4 (line 5)" for JSON Lines files
        where = f"{source}: {location}"
        try:
            problem = source_problem(record)  # unreadable line or mistyped field, kept by stage 1 for skipping
            if problem is None:
                messages = conversation_from_record(record, schema, where)
                problem = conversation_problem(messages, where)
        except _BadRecord as bad:
            problem = str(bad)
        if problem is None:
            conversations.append((index, location, messages))
        elif not skip_invalid:
            raise DataFormatError(f"{problem}. Fix: correct the record, {SKIP_HINT}.")
        else:
            problems.append(problem)
    report_skipped(source, problems, total, what="conversations")
    if not conversations:
        raise DataFormatError(f"{source}: no usable conversations.")
    logger.info("%s: %d conversations in the %s schema.", source, len(conversations), schema)
    return conversations


def _shorter_histories(messages: list[Message], keep_last: int) -> Iterator[tuple[int, list[Message]]]:
    """The conversation, then without its oldest user/assistant pair, and so on (system kept).

    ``keep_last`` messages at the end (the final pair, or the final user turn) are never dropped.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    for dropped in range(0, len(turns) - keep_last + 1, 2):
        yield dropped // 2, system + turns[dropped:]


def _lengths(pieces: list[EncodedPiece]) -> tuple[int, int]:
    """Total tokens, and tokens before the last answer (the prompt budget's part)."""
    total = sum(len(ids) for ids, _ in pieces)
    last_answer = max(i for i, (_, kind) in enumerate(pieces) if kind == ANSWER)
    return total, sum(len(ids) for ids, _ in pieces[:last_answer])


def fit_conversation(
    encoder: PieceEncoder, messages: list[Message], chat_format: ChatFormat, *, max_seq_length: int,
    max_source_length: int,
) -> tuple[list[EncodedPiece], int]:
    """The conversation's pieces, without as many of its oldest user/assistant pairs as it takes to fit.

    Oldest pairs go first until the prompt of the last answer fits ``max_source_length`` and
    everything fits ``max_seq_length``. If the last pair alone is still too long, its pieces
    are returned as they are: ``tokenize_segments`` then cuts its answer (end-of-turn tokens
    kept) or, when even its prompt does not fit, drops it.

    Returns:
        The encoded pieces, and the number of pairs dropped.
    """
    for dropped, kept in _shorter_histories(messages, keep_last=2):
        pieces = chat_pieces(encoder, kept, chat_format)
        total, prompt = _lengths(pieces)
        if total <= max_seq_length and prompt <= max_source_length:
            break
    return pieces, dropped


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_format: ChatFormat, *,
    max_prompt_tokens: int | None = None, encoder: PieceEncoder | None = None,
) -> list[int]:
    """Token ids that ask the model for the next assistant turn, exactly as training rendered it.

    Args:
        tokenizer: The model's tokenizer.
        messages: The history, ending with the user turn to answer.
        chat_format: The format training used (``resolve_chat_format``).
        max_prompt_tokens: Drop the oldest user/assistant pairs until the prompt fits.
        encoder: A ``PieceEncoder`` to reuse (its cache) across turns.

    Raises:
        DataFormatError: if the conversation is malformed, or the last user turn alone is too long.
    """
    problem = conversation_problem(messages, "chat", for_generation=True)
    if problem:
        raise DataFormatError(problem + ".")
    encoder = encoder or PieceEncoder(tokenizer)
    for _, kept in _shorter_histories(messages, keep_last=1):
        pieces = chat_pieces(encoder, kept, chat_format, add_generation_prompt=True)
        ids = [token for piece, _ in pieces for token in piece]
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            return ids
    raise DataFormatError(
        f"chat: the last message makes a {len(ids)}-token prompt, more than the {max_prompt_tokens} allowed "
        "(--max_prompt_tokens); shorten it."
    )


class ChatSegments:
    """Record -> the segments of one training conversation (a class: it pickles to map workers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, schema: str, source: str,
                 max_seq_length: int, max_source_length: int):
        self.encoder, self.chat_format, self.schema, self.source = PieceEncoder(tokenizer), chat_format, schema, source
        self.limits = {"max_seq_length": max_seq_length, "max_source_length": max_source_length}

    def __call__(self, record: dict, index: int) -> tuple[list[Segment], int]:
        self.encoder.clear()  # the cache only pays off within one conversation
        messages = conversation_from_record(record, self.schema, f"{self.source}: {record_location(record, index)}")
        pieces, dropped = fit_conversation(self.encoder, messages, self.chat_format, **self.limits)
        return list(pieces), dropped


def chat_rows(
    dataset: datasets.Dataset, source: str, tokenizer: PreTrainedTokenizerBase, *, chat_template: str | None = None,
    max_seq_length: int = 512, max_source_length: int = 384, train_on_inputs: bool = False,
    skip_invalid: bool = False,
) -> RowFormat:
    """Check every conversation, then say how each becomes one sample (``render_chat_records``).

    Raises:
        DataFormatError: for bad records.
        ConfigError: for an unusable ``chat_template``.
    """
    chat_format = resolve_chat_format(chat_template, tokenizer)
    schema = detect_chat_schema(dataset.column_names, source)
    kept = [index for index, _, _ in read_located_conversations(dataset, dataset.column_names, source,
                                                                skip_invalid=skip_invalid)]
    limits = f"--max_source_length {max_source_length} / --max_seq_length {max_seq_length}"

    def finish(stats: RenderStats, pairs_dropped: list[int]) -> None:
        if any(pairs_dropped):
            logger.info("%s: dropped %d oldest user/assistant pair(s) to fit %s.", source, sum(pairs_dropped), limits)
        if stats.dropped_long_prompt:
            first = stats.dropped_indices[0]
            logger.warning("%s: %d conversation(s) dropped: the last user turn does not fit %s (first: %s).",
                           source, stats.dropped_long_prompt, limits, record_location(dataset[first], first))
        if not stats.kept:
            raise DataFormatError(f"{source}: no conversation fits {limits}; raise them.")

    return RowFormat(
        kept, ChatSegments(tokenizer, chat_format, schema, source, max_seq_length, max_source_length),
        key={"task": "chat", "schema": schema, "format": chat_format.name, "template": chat_format.template,
             "max_source_length": max_source_length},
        max_length=max_seq_length, max_prompt_length=max_source_length, train_on_inputs=train_on_inputs,
        shortened_truncates=True, finish=finish,
    )


def render_chat_records(
    records: Iterable[dict],
    columns: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    chat_template: str | None = None,
    max_seq_length: int = 512,
    max_source_length: int = 384,
    train_on_inputs: bool = False,
    skip_invalid: bool = False,
) -> tuple[dict[str, list[list[int]]], RenderStats]:
    """One training sample per conversation, every assistant turn (with its end-of-turn tokens) supervised.

    Args:
        records: Raw records in a chat schema (``detect_chat_schema``).
        columns: Their column names.
        tokenizer: Tokenizes the pieces; its BOS is added where it adds one.
        source: File or dataset name, for messages.
        chat_template: ``neural-chat`` (default), ``tokenizer`` or a Jinja file path.
        max_seq_length: Maximum tokens per sample.
        max_source_length: Maximum tokens before the last assistant answer.
        train_on_inputs: Supervise the prompt tokens too.
        skip_invalid: Drop bad conversations (reported) instead of raising.

    Returns:
        ``{"input_ids", "labels"}`` lists and the rendering statistics.

    Raises:
        DataFormatError: for bad records, or when no conversation fits.
        ConfigError: for an unusable ``chat_template``.
    """
    detect_chat_schema(columns, source)
    return render_records(records, lambda dataset: chat_rows(
        dataset, source, tokenizer, chat_template=chat_template, max_seq_length=max_seq_length,
        max_source_length=max_source_length, train_on_inputs=train_on_inputs, skip_invalid=skip_invalid,
    ), tokenizer)
