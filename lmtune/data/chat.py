"""Chat data: conversations -> token ids, rendered the same way for training and for ``lmtune chat``.

Stage contract (the chat counterpart of formats.py + render.py):

- ``read_conversations`` reads records in the ``messages`` schema (role/content, as
  HuggingFaceH4/ultrachat_200k), the ShareGPT ``conversations`` schema (from/value, as
  Open-Orca/SlimOrca) or the Intel/orca_dpo_pairs schema (system/question/chosen), and checks
  every conversation before anything is tokenized, naming file, record and message index.
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

from transformers import PreTrainedTokenizerBase

from lmtune.data.chat_format import (
    ANSWER,
    ChatFormat,
    PROMPT,
    EncodedPiece,
    Message,
    PieceEncoder,
    chat_pieces,
    resolve_chat_format,
)
from lmtune.data.render import IGNORE_INDEX, RenderStats
from lmtune.data.sources import SKIP_HINT, record_location, report_skipped, source_problem
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
    present = set(columns)
    if "messages" in present:
        return "messages"
    if "conversations" in present:
        return "conversations"
    if {"question", "chosen"} <= present:
        return "orca_dpo_pairs"
    raise DataFormatError(
        f"{source}: records have fields {sorted(present)}, which match no chat schema. Accepted: "
        "messages (a list of {role, content}), conversations (a list of {from, value}, ShareGPT/SlimOrca), "
        "system + question + chosen (Intel/orca_dpo_pairs). For instruction records use --task completion."
    )


def _text_field(item: object, key: str, where: str) -> str:
    if not isinstance(item, dict):
        raise _BadRecord(f"{where} is a {type(item).__name__}, expected an object with '{key}'")
    value = item.get(key)
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise _BadRecord(f"{where}: '{key}' is {got}, expected a string")
    return value


def _from_sharegpt(turns: object, where: str) -> list[Message]:
    if not isinstance(turns, list):
        raise _BadRecord(f"{where}: 'conversations' is a {type(turns).__name__}, expected a list of {{from, value}}")
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
        where: ``"FILE: record N"``, the prefix of every message about this record.
    """
    if schema == "conversations":
        return _from_sharegpt(record.get("conversations"), where)
    if schema == "orca_dpo_pairs":
        # One turn: the question answered by the preferred ("chosen") response.
        system = record.get("system") or ""
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return messages + [
            {"role": "user", "content": _text_field(record, "question", where)},
            {"role": "assistant", "content": _text_field(record, "chosen", where)},
        ]
    raw = record.get("messages")
    if not isinstance(raw, list):
        got = "missing" if raw is None else f"a {type(raw).__name__}"
        raise _BadRecord(f"{where}: 'messages' is {got}, expected a list of {{role, content}}")
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
        DataFormatError: on the first bad record (file, record and message index named), or
            when skipping would drop more than ``MAX_INVALID_SHARE`` of the records.
    """
    schema = detect_chat_schema(columns, source)
    conversations, problems, total = [], [], 0
    for index, record in enumerate(records):
        total += 1
        where = f"{source}: {record_location(record, index)}"  # "record 4 (line 5)" for JSON files
        try:
            problem = source_problem(record)  # unreadable line or mistyped field, kept by stage 1 for skipping
            if problem is None:
                messages = conversation_from_record(record, schema, where)
                problem = conversation_problem(messages, where)
        except _BadRecord as bad:
            problem = str(bad)
        if problem is None:
            conversations.append((index, messages))
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
) -> tuple[list[EncodedPiece] | None, int, bool]:
    """Render a training conversation within the length limits.

    Oldest user/assistant pairs go first until the prompt of the last answer fits
    ``max_source_length`` and everything fits ``max_seq_length``. If the last pair alone is
    too long, its answer is cut (its end-of-turn tokens kept); if even its prompt does not
    fit, the conversation is dropped (None).

    Returns:
        The encoded pieces (or None), the number of pairs dropped, and whether the answer was cut.
    """
    for dropped, kept in _shorter_histories(messages, keep_last=2):
        pieces = chat_pieces(encoder, kept, chat_format)
        total, prompt = _lengths(pieces)
        if total <= max_seq_length and prompt <= max_source_length:
            return pieces, dropped, False
    last_answer = max(i for i, (_, kind) in enumerate(pieces) if kind == ANSWER)
    room = len(pieces[last_answer][0]) - (total - max_seq_length)
    if prompt > max_source_length or room < 1:
        return None, dropped, False
    pieces[last_answer] = (pieces[last_answer][0][:room], ANSWER)
    return pieces, dropped, True


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
    """One training sample per conversation, every assistant turn supervised.

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
    chat_format = resolve_chat_format(chat_template, tokenizer)
    conversations = read_conversations(records, columns, source, skip_invalid=skip_invalid)
    encoder = PieceEncoder(tokenizer)
    stats, pairs_dropped = RenderStats(), 0
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for index, messages in conversations:
        encoder.clear()  # the cache only pays off within one conversation
        pieces, dropped, cut = fit_conversation(
            encoder, messages, chat_format, max_seq_length=max_seq_length, max_source_length=max_source_length
        )
        if pieces is None:
            stats.dropped_long_prompt += 1
            stats.dropped_indices.append(index)
            continue
        pairs_dropped += dropped
        stats.truncated += int(cut or dropped > 0)
        ids = [token for piece, _ in pieces for token in piece]
        labels = [
            token if train_on_inputs or kind != PROMPT else IGNORE_INDEX for piece, kind in pieces for token in piece
        ]
        labels[0] = IGNORE_INDEX  # the first token is never predicted
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        stats.kept += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += sum(label != IGNORE_INDEX for label in labels)
    if pairs_dropped:
        logger.info("%s: dropped %d oldest user/assistant pair(s) to fit --max_seq_length %d / --max_source_length "
                    "%d.", source, pairs_dropped, max_seq_length, max_source_length)
    if stats.dropped_long_prompt:
        logger.warning(
            "%s: %d conversation(s) dropped: the last user turn does not fit --max_source_length %d / "
            "--max_seq_length %d (first: record %d).", source, stats.dropped_long_prompt, max_source_length,
            max_seq_length, stats.dropped_indices[0],
        )
    if not stats.kept:
        raise DataFormatError(
            f"{source}: no conversation fits --max_source_length {max_source_length} / --max_seq_length "
            f"{max_seq_length}; raise them."
        )
    return out, stats
