"""MBPP problems (``mbpp.jsonl`` or ``sanitized-mbpp.json``) as HumanEval-shaped problems.

Stage contract: an MBPP file in; problems with ``task_id``, ``prompt``, ``entry_point``, ``test``
and ``canonical_solution`` out, which ``humaneval.evaluate_humaneval`` generates for and runs in
its sandbox unchanged. Scoring follows bigcode-evaluation-harness's zero-shot MBPP task:

- the prompt is the description and the first test in a docstring (``'''text\\nassert ...\\n'''``),
  so the model sees the function name and call shape it must write;
- the model writes the whole function; generation stops at MBPP's own stop sequences
  (``MBPP_STOP_SEQUENCES``, where HumanEval's ``\\ndef`` would cut off helper functions);
- a completion passes when every assertion of ``test_list`` holds, run after the dataset's
  ``test_setup_code`` (original file) or ``test_imports`` (sanitized file), exactly as given.
  ``challenge_test_list`` (harder extra tests, 11 problems) is not run, as in the harness.

Only the test split (task ids 11-510, as the MBPP README splits the original file) is read by
default: ids 1-10 are the few-shot prompt examples and 511-974 are for validation and training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmtune.errors import DataFormatError

MBPP_STOP_SEQUENCES = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
TEST_SPLIT = range(11, 511)
_DEF = re.compile(r"^def\s+(\w+)\s*\(", re.MULTILINE)


def _read_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataFormatError(f"MBPP file not found: {path}. Pass mbpp.jsonl or sanitized-mbpp.json.") from err
    if text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: line {number} is not valid JSON ({err})") from err
    return records


def _entry_point(code: str, tests: list[str]) -> str:
    """The function the tests call: the first ``def`` of the reference code that they name."""
    names = _DEF.findall(code)
    called = [name for name in names if any(re.search(rf"\b{name}\s*\(", test) for test in tests)]
    return (called or names or ["None"])[0]


def mbpp_problem(record: dict, *, source: str = "mbpp", index: int = 0) -> dict:
    """One MBPP record as a HumanEval-shaped problem (see the module docstring).

    Raises:
        DataFormatError: for a record without its description, code or tests.
    """
    text = record.get("text", record.get("prompt"))
    tests, code = record.get("test_list"), record.get("code")
    if not isinstance(text, str) or not isinstance(code, str) or not isinstance(tests, list) or not tests:
        raise DataFormatError(f"{source}: record {index} (task_id {record.get('task_id')}) needs 'text' (or "
                              "'prompt'), 'code' and a non-empty 'test_list'")
    setup = record.get("test_setup_code") or "\n".join(record.get("test_imports") or [])
    body = "\n".join(f"    {line}" for test in tests for line in test.replace("\r\n", "\n").split("\n"))
    return {
        "task_id": f"MBPP/{record.get('task_id', index)}",
        "prompt": f'"""\n{text.strip()}\n{tests[0].strip()}\n"""\n',
        "entry_point": _entry_point(code, tests),
        "test": f"{setup.replace(chr(13), '')}\n\ndef check(candidate):\n{body}\n",
        "canonical_solution": code.replace("\r\n", "\n"),
    }


def load_mbpp(path: str | Path, *, test_split_only: bool = True) -> list[dict]:
    """MBPP problems from the original ``mbpp.jsonl`` or the hand-verified ``sanitized-mbpp.json``.

    Args:
        path: The file (JSON lines or one JSON array).
        test_split_only: Keep task ids 11-510 (the benchmark's test split) when the file has them.

    Returns:
        HumanEval-shaped problems in file order.

    Raises:
        DataFormatError: for a missing file, a line that is not JSON, a malformed record, or no problems.
    """
    path = Path(path)
    records = _read_records(path)
    if test_split_only and any(record.get("task_id") in TEST_SPLIT for record in records):
        records = [record for record in records if record.get("task_id") in TEST_SPLIT]
    problems = [mbpp_problem(record, source=str(path), index=i) for i, record in enumerate(records)]
    if not problems:
        raise DataFormatError(f"{path}: no MBPP problems found")
    return problems
