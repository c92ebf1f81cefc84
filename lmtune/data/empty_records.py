"""Records with nothing to learn: left out and counted by default, refused with ``--strict_records``.

Real instruction data sets hold records whose response (or instruction, or an assistant turn)
is an empty string: the 52k Alpaca file (record 284), tatsu-lab/alpaca, CodeAlpaca-20k
(record 237), SlimOrca, Intel's domain file. The reference trained on them as they are. Such a
record is well-formed, so it is not an error here: it is left out before rendering, all of them
are counted and the first few named in one warning. ``--strict_records`` refuses the data
instead, naming every such record up to ``SHOWN_IN_ERROR``. A structurally broken record (a
missing field, a wrong type, an unreadable line) is not touched here: the renderers stop at it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import datasets

from lmtune.data.chat import detect_chat_schema
from lmtune.data.formats import INSTRUCTION_FORMATS, detect_format
from lmtune.data.sources import LOCATION_COLUMN, PROBLEM_COLUMN
from lmtune.data.summarization import SUMMARIZATION_FORMAT
from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

STRICT_FLAG = "--strict_records"
SHOWN_IN_WARNING = 5
SHOWN_IN_ERROR = 20
# Conversation schemas: the list field, and in each turn the speaker and the text keys.
_TURNS = {"messages": ("messages", "role", "content"), "conversations": ("conversations", "from", "value")}
# Fields that may be empty on purpose: a plain continuation has no prompt.
_MAY_BE_EMPTY = {"prompt"}


def _blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _empty_fields(dataset: datasets.Dataset, names: Iterable[str]) -> Iterator[tuple[int, str]]:
    for name in names:
        for index, value in enumerate(dataset[name]):
            if _blank(value):
                yield index, f"field '{name}' is empty"


def _empty_turns(dataset: datasets.Dataset, schema: str) -> Iterator[tuple[int, str]]:
    """Conversations with no turns, or a user/assistant turn without text (an empty system turn
    only means "the default system prompt", see ``data/chat.py``)."""
    column, speaker, text = _TURNS[schema]
    for index, turns in enumerate(dataset[column]):
        if not isinstance(turns, list):
            continue  # a structural problem: the renderer names it
        if not turns:
            yield index, "the conversation is empty"
        for number, turn in enumerate(turns):
            if isinstance(turn, dict) and turn.get(speaker) != "system" and _blank(turn.get(text)):
                yield index, f"message {number}: the {turn.get(speaker)} message is empty"
                break


def find_empty_records(dataset: datasets.Dataset, task: str) -> dict[int, str]:
    """``{record index: what is empty}`` for records whose text to learn (or learn from) is blank.

    Records the renderer will reject anyway (no recognizable format, a wrong type, a problem
    found while reading the file) are not reported here.
    """
    columns = set(dataset.column_names)
    try:
        if task == "chat":
            schema = detect_chat_schema(columns, "")
            found = _empty_turns(dataset, schema) if schema in _TURNS else _empty_fields(
                dataset, ("question", "chosen"))
        else:
            formats = (SUMMARIZATION_FORMAT,) if task == "summarization" else INSTRUCTION_FORMATS
            fmt = detect_format(columns, "", formats)
            found = _empty_fields(dataset, [name for name in fmt.required if name not in _MAY_BE_EMPTY])
        empty: dict[int, str] = {}
        for index, what in found:
            empty.setdefault(index, what)
    except DataFormatError:
        return {}  # no known schema: the renderer says so, with the fields it found
    if PROBLEM_COLUMN in columns:  # kept for --skip_invalid_records: the renderer reports those
        problems = dataset[PROBLEM_COLUMN]
        empty = {index: what for index, what in empty.items() if problems[index] is None}
    return dict(sorted(empty.items()))


def _listing(named: list[str], shown: int) -> str:
    more = f"; and {len(named) - shown} more" if len(named) > shown else ""
    return "; ".join(named[:shown]) + more


def drop_empty_records(dataset: datasets.Dataset, *, task: str, source: str, strict: bool = False
                       ) -> datasets.Dataset:
    """Leave out records with nothing to learn (one warning), or refuse them with ``strict``.

    Each kept record carries its original place in ``LOCATION_COLUMN``, so later messages still
    name it as it is numbered in the source.

    Raises:
        DataFormatError: with ``strict``, naming every empty record up to ``SHOWN_IN_ERROR``;
            and when every record is empty.
    """
    empty = find_empty_records(dataset, task)
    if not empty:
        return dataset
    total = len(dataset)
    locations = dataset[LOCATION_COLUMN] if LOCATION_COLUMN in dataset.column_names else None
    named = [f"{locations[i] if locations else f'record {i}'}: {what}" for i, what in empty.items()]
    if strict:
        raise DataFormatError(
            f"{source}: {len(empty)} of {total} records have an empty text field, which {STRICT_FLAG} refuses: "
            f"{_listing(named, SHOWN_IN_ERROR)}. Fix: fill in or remove those records, or drop {STRICT_FLAG} "
            "to leave them out."
        )
    if len(empty) == total:
        raise DataFormatError(f"{source}: all {total} records have an empty text field ({_listing(named, 3)}); "
                              "nothing is left to train on.")
    logger.warning("%s: left out %d of %d records with an empty text field (%s); pass %s to stop at them instead.",
                   source, len(empty), total, _listing(named, SHOWN_IN_WARNING), STRICT_FLAG)
    if locations is None:
        dataset = dataset.add_column(LOCATION_COLUMN, [f"record {i}" for i in range(total)])
    return dataset.select([i for i in range(total) if i not in empty])
