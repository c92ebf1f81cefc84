"""Reading JSON and JSON Lines data files record by record, naming every problem's place.

Contract: ``read_json_records`` returns plain dicts, each with its place in the file in
``LOCATION_COLUMN`` (``record 10 (line 11)``); ``consistent_records`` makes sure every field has
one type across records, as Arrow needs. Problems raise ``DataFormatError`` naming the file,
line or record, field, what was found and expected, and the fix. With ``skip_invalid`` a bad
line or record is kept instead as a row whose ``PROBLEM_COLUMN`` says what is wrong (its bad
field set to null), for stage 2 to skip and count with every other bad record.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lmtune.errors import DataFormatError

LOCATION_COLUMN = "_lmtune_location"
PROBLEM_COLUMN = "_lmtune_problem"
SKIP_HINT = "or pass --skip_invalid_records to skip bad records"


def record_location(record: dict, index: int) -> str:
    """Where a record sits in its source: ``record 10 (line 11)`` for a JSON Lines file."""
    return record.get(LOCATION_COLUMN) or f"record {index}"


def describe_value(value: Any, limit: int = 60) -> str:
    """``a list (['Describe the…'])``: the JSON kind of a value and a short excerpt of it."""
    if value is None:
        return "null"
    kinds = {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    kind = kinds.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{kind} ({text if len(text) <= limit else text[: limit - 1] + '…'})"


def _undecodable(path: Path, raw: bytes, err: UnicodeDecodeError, offset: int = 0) -> str:
    start = offset + err.start
    line = raw[:start].count(b"\n") + 1
    column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
    return (f"{path}: line {line}, column {column}: byte 0x{raw[start]:02x} is not valid UTF-8; expected UTF-8 "
            "text. Fix: re-save the file as UTF-8 (this byte looks like cp1252/latin-1 text)")


def _reject_utf16(path: Path, raw: bytes) -> None:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFormatError(f"{path}: the file is UTF-16 encoded; expected UTF-8. Fix: re-save it as UTF-8.")


def decode_utf8(path: Path, raw: bytes) -> str:
    """The file's text (a UTF-8 byte-order mark dropped), or an error naming the undecodable byte's line."""
    _reject_utf16(path, raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(_undecodable(path, raw, err) + ".") from err


def _read_json_array(path: Path, text: str) -> list[Any]:
    """Parse ``[...]`` element by element, so that an error names the record it is in."""
    decoder = json.JSONDecoder()
    records: list[Any] = []
    end = len(text)
    pos = text.index("[") + 1

    def skip_space(at: int) -> int:
        while at < end and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip_space(pos)
    while pos < end and text[pos] != "]":
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(_array_syntax(path, text, err, len(records))) from err
        records.append(record)
        pos = skip_space(pos)
        if pos < end and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < end and text[pos] != "]":
            err = json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            raise DataFormatError(_array_syntax(path, text, err, len(records))) from None
    if pos >= end:
        err = json.JSONDecodeError("the array is never closed with ']'", text, end)
        raise DataFormatError(_array_syntax(path, text, err, len(records)))
    if text[pos + 1 :].strip():
        line = text.count("\n", 0, pos) + 1
        raise DataFormatError(f"{path}: line {line}: text after the closing ']'; expected the end of the file. "
                              "Fix: remove it (two arrays in one file?).")
    return records


def _array_syntax(path: Path, text: str, err: json.JSONDecodeError, index: int) -> str:
    truncated = not text.rstrip().endswith("]")
    where = f"record {index}: {err.msg.removesuffix(' at')} at line {err.lineno}, column {err.colno}"
    if truncated:
        intact = f"records 0-{index - 1} are complete" if index else "no record is complete"
        return (f"{path}: {where}; the file ends before its JSON array is closed, so it looks "
                f"truncated ({intact}). Fix: restore the whole file.")
    return (f"{path}: {where}: not valid JSON; expected a JSON array of objects. "
            "Fix: repair the syntax there (a missing comma, quote or brace?).")


def _whole_object_problem(path: Path, text: str) -> str | None:
    """A .json file holding one object (columns, or records under a key) instead of records."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or text.strip().count("\n") == 0:
        return None
    lists = [key for key, item in value.items() if isinstance(item, list)]
    hint = f" (are the records under '{lists[0]}'? save that list on its own)" if lists else ""
    return (f"{path}: the file holds one JSON object{hint}; expected a JSON array of records, or one "
            "JSON object per line. Fix: write the records as [{...}, {...}] or as JSON Lines.")


def _read_json_lines(path: Path, raw: bytes, skip_invalid: bool) -> list[dict]:
    """One object per line; a bad line is an error, or skipped and reported with --skip_invalid_records."""
    records: list[dict] = []
    offset = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    for number, line in enumerate(raw[offset:].split(b"\n"), start=1):
        start = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        problem, record = _parse_line(path, raw, line, number, start)
        if problem is None:
            record[LOCATION_COLUMN] = f"record {len(records)} (line {number})"
        elif not skip_invalid:
            raise DataFormatError(f"{problem}, {SKIP_HINT}.")
        else:
            record = {LOCATION_COLUMN: f"line {number}", PROBLEM_COLUMN: problem}
        records.append(record)
    return records


def _parse_line(path: Path, raw: bytes, line: bytes, number: int, start: int) -> tuple[str | None, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return _undecodable(path, raw, err, start), None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return (f"{path}: line {number}, column {err.colno}: not valid JSON ({err.msg}); expected one complete "
                "JSON object per line. Fix: repair that line (a missing brace, comma or quote?)"), None
    if not isinstance(record, dict):
        return (f"{path}: line {number}: is {describe_value(record)}; expected a JSON object with the record's "
                "fields. Fix: write one {...} object per line"), None
    return None, record


def read_json_records(path: str | Path, *, skip_invalid: bool = False) -> list[dict]:
    """Read a JSON array of objects, or JSON Lines, into a list of dicts.

    The layout is taken from the content, not the suffix: a file starting with ``[`` is an
    array, anything else one object per line. A UTF-8 byte-order mark and CRLF line ends are
    accepted.

    Args:
        path: The file.
        skip_invalid: Keep JSON Lines lines that are undecodable, not JSON or not objects as
            rows holding only ``PROBLEM_COLUMN`` (for stage 2 to skip), instead of raising.

    Returns:
        The records, each with its ``LOCATION_COLUMN``.

    Raises:
        DataFormatError: naming the file, line/record and problem, for syntax errors,
            undecodable bytes, an empty file or an entry that is not an object.
    """
    path = Path(path)
    raw = path.read_bytes()
    _reject_utf16(path, raw)
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DataFormatError(
            f"{path}: the file is empty ({len(raw)} bytes); expected a JSON array of records or one JSON object "
            "per line. Fix: point the flag at the file that holds the data."
        )
    if raw.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
        records = _read_json_array(path, decode_utf8(path, raw))
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: record {index} is {describe_value(record)}; expected an object "
                                      "with the record's fields. Fix: make every array entry a {...} object.")
            record[LOCATION_COLUMN] = f"record {index}"
    else:
        try:
            whole = _whole_object_problem(path, raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            whole = None  # reported line by line below
        if whole:
            raise DataFormatError(whole)
        records = _read_json_lines(path, raw, skip_invalid)
    if not records:
        raise DataFormatError(f"{path}: holds no records (an empty array); expected at least one record.")
    return records


def _shape(value: Any) -> Any:
    """The Arrow-relevant structure of a JSON value: kind names, nested for lists and objects."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element = None
        for item in value:
            element = _merge(element, _shape(item), "[]")
        return ("list", element)
    if isinstance(value, dict):
        return ("object", {key: _shape(item) for key, item in value.items()})
    return type(value).__name__


class _Conflict(Exception):
    """Two records disagree about the type at ``path`` (``.messages[].content``)."""

    def __init__(self, path: str, first: Any, second: Any) -> None:
        super().__init__(path)
        self.path, self.first, self.second = path, first, second


def _kind(shape: Any) -> str:
    if isinstance(shape, tuple):
        return "a list" if shape[0] == "list" else "an object"
    return {"string": "a string", "number": "a number"}.get(shape, str(shape))


def _merge(a: Any, b: Any, path: str) -> Any:
    """One shape that holds both, as Arrow would infer it; ``_Conflict`` where none does."""
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            return ("list", _merge(a[1], b[1], path + "[]"))
        keys = {**a[1], **b[1]}
        return ("object", {k: _merge(a[1].get(k), b[1].get(k), f"{path}.{k}") for k in keys})
    raise _Conflict(path, a, b)


def _type_problems(path: Path, records: list[dict]) -> dict[int, tuple[str, str]]:
    """Records whose field types differ from the rest (Arrow needs one type per column).

    The type most records use is the expected one, so one bad record is named, not the good ones.
    """
    problems: dict[int, str] = {}
    columns = {key for record in records for key in record} - {LOCATION_COLUMN}
    for column in sorted(columns):
        shapes = [_shape(record.get(column)) for record in records]
        top_kinds = Counter(_kind(s) for s in shapes if s is not None)
        if not top_kinds:
            continue
        usual, count = top_kinds.most_common(1)[0]
        merged = None
        for index, shape in enumerate(shapes):
            if shape is None or index in problems:
                continue
            where = record_location(records[index], index)
            if _kind(shape) != usual:
                problems[index] = (column, f"{path}: {where}: field '{column}' is "
                                   f"{describe_value(records[index][column])}; expected {usual}, as in {count} other records")
                continue
            try:
                merged = _merge(merged, shape, column)
            except _Conflict as conflict:
                problems[index] = (column, f"{path}: {where}: field '{conflict.path}' is {_kind(conflict.second)}; "
                                   f"expected {_kind(conflict.first)}, as in the records before it")
    return problems


def consistent_records(path: Path, records: list[dict], skip_invalid: bool) -> list[dict]:
    """Raise on the first record whose field types differ from the rest, or mark it for skipping.

    Raises:
        DataFormatError: naming the record, field, its type and the type the other records use.
    """
    problems = _type_problems(path, records)
    if problems and not skip_invalid:
        message = problems[min(problems)][1]
        raise DataFormatError(f"{message}. Fix: give that field the same type in every record, {SKIP_HINT}.")
    for index, (column, message) in problems.items():
        records[index][column] = None  # Arrow holds one type per column; the record is skipped anyway
        records[index][PROBLEM_COLUMN] = message
    return records
