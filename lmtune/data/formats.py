"""Stage 2 of the data flow: raw records -> prompt/response examples.

A record's format is recognized from its fields, never from the file or dataset name
(the reference accepted only names containing "alpaca"). The prompt texts are the
reference's, word for word. Every record is checked here, with its index, before any
model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

from lmtune.data.render import ANSWER, END, PROMPT, Segment
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

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
QUESTION_ANSWER_PROMPT = "Question: {question}\n\nAnswer: "


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The reference's Alpaca prompt, ending in ``### Response:\\n``."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class RecordFormat:
    """A record schema: fields that identify it and how a record becomes prompt + response."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    to_example: Callable[[dict], dict[str, str]]


def _alpaca(record: dict) -> dict[str, str]:
    return {"prompt": alpaca_prompt(record["instruction"], record.get("input")), "response": record["output"]}


def _question_answer(record: dict) -> dict[str, str]:
    return {"prompt": QUESTION_ANSWER_PROMPT.format(question=record["question"]), "response": record["response"]}


def _prompt_completion(record: dict) -> dict[str, str]:
    return {"prompt": record["prompt"], "response": record["completion"]}


def _plain_text(record: dict) -> dict[str, str]:
    return {"prompt": "", "response": record["text"]}


# Intel/orca_dpo_pairs, supervised on the chosen answer. The reference glued system and question
# together with no separator. Here the system text takes the place of Alpaca's preamble (which is
# itself a system prompt) ahead of the question as the instruction: records without a system prompt
# get exactly the Alpaca prompt every other instruction record of --task completion trains on, and
# the model still sees where the system text ends and the question begins. This stays a plain
# prompt/response pair on purpose; --task chat reads the same records as a one-turn conversation in
# the chat format that `lmtune chat` uses (lmtune.data.chat).
ORCA_DPO_PROMPT = "{system}\n\n### Instruction:\n{question}\n\n### Response:\n"


def _orca_dpo(record: dict) -> dict[str, str]:
    system = (record.get("system") or "").strip()
    if not system:
        return {"prompt": alpaca_prompt(record["question"]), "response": record["chosen"]}
    return {"prompt": ORCA_DPO_PROMPT.format(system=system, question=record["question"]), "response": record["chosen"]}


# Detection order matters: the first format whose required fields are all present wins.
INSTRUCTION_FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("alpaca", ("instruction", "output"), ("input",), _alpaca),
    RecordFormat("question-answer", ("question", "response"), (), _question_answer),
    RecordFormat("orca-dpo-pairs", ("question", "chosen"), ("system",), _orca_dpo),
    RecordFormat("prompt-completion", ("prompt", "completion"), (), _prompt_completion),
    RecordFormat("text", ("text",), (), _plain_text),
)


def detect_format(columns: Iterable[str], source: str, formats: tuple[RecordFormat, ...] = INSTRUCTION_FORMATS
                  ) -> RecordFormat:
    """Pick the record format from the column names.

    Raises:
        DataFormatError: naming the columns found, the closest format and what it lacks, and
            the schemas accepted.
    """
    present = set(columns) - {LOCATION_COLUMN, PROBLEM_COLUMN}
    for fmt in formats:
        if set(fmt.required) <= present:
            return fmt
    closest = max(formats, key=lambda f: len(set(f.required) & present))
    missing = [name for name in closest.required if name not in present]
    hint = ""
    if set(closest.required) & present:
        hint = f" Closest: {closest.name}, which also needs {', '.join(repr(m) for m in missing)}."
    if present & set(CONVERSATION_FIELDS):
        hint += f" The '{sorted(present & set(CONVERSATION_FIELDS))[0]}' field holds conversations: pass --task chat."
    accepted = "; ".join(f"{f.name} ({', '.join(f.required + f.optional)})" for f in formats)
    raise DataFormatError(
        f"{source}: the records have fields {sorted(present)}, which match no known format.{hint} "
        f"Expected one of: {accepted}. Fix: rename the fields (or choose the --task that reads them)."
    )


# Fields that hold whole conversations (``--task chat``): ultrachat's messages, ShareGPT/SlimOrca's conversations.
CONVERSATION_FIELDS = ("messages", "conversations")


def task_for_fields(task: str, columns: Iterable[str]) -> str:
    """``chat`` for conversation records under the default ``--task completion``, with a notice; else ``task``.

    Records with instruction fields as well stay instruction records: the notice is for data that
    --task completion could not read at all.
    """
    present = set(columns or ()) - {LOCATION_COLUMN, PROBLEM_COLUMN}
    found = sorted(present & set(CONVERSATION_FIELDS))
    if task != "completion" or not found or any(set(f.required) <= present for f in INSTRUCTION_FORMATS):
        return task
    logger.warning("the records hold conversations (a '%s' field): training them as --task chat; pass --task chat "
                   "to say so.", found[0])
    return "chat"


def _needs(fmt: RecordFormat) -> str:
    optional = f", and optionally {', '.join(fmt.optional)}" if fmt.optional else ""
    return f"{fmt.name} records have {', '.join(fmt.required)}{optional}"


def check_record(record: dict, fmt: RecordFormat, index: int, source: str) -> str | None:
    """Return what is wrong with one record, or None when it is usable.

    The message names the source, the record (and line, for JSON Lines), the field, what it
    holds and what was expected.
    """
    problem = source_problem(record)  # an unreadable line, or a field whose type differs from the rest
    if problem is not None:
        return problem
    where = f"{source}: {record_location(record, index)}: field"
    for name in fmt.required:
        value = record.get(name)
        if value is None:
            return f"{where} '{name}' is missing (or null); expected a string ({_needs(fmt)})"
        if not isinstance(value, str):
            return f"{where} '{name}' is {describe_value(value)}; expected a string"
        if not value.strip() and name != "prompt":
            return f"{where} '{name}' is empty; expected text to {'learn' if name in _TARGETS else 'learn from'}"
    for name in fmt.optional:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"{where} '{name}' is {describe_value(value)}; expected a string (or no '{name}' field)"
    return None


# Fields that hold what the model is trained to produce (named in "is empty" messages).
_TARGETS = {"output", "response", "completion", "chosen", "text", "highlights"}


def check_records(
    records: Iterable[dict],
    columns: Iterable[str],
    source: str,
    *,
    skip_invalid: bool = False,
    formats: tuple[RecordFormat, ...] = INSTRUCTION_FORMATS,
) -> tuple[RecordFormat, list[int]]:
    """Recognize the format and check every record, before anything is tokenized.

    Args:
        records: Raw records (dicts).
        columns: Their column names, for format detection.
        source: File or dataset name, used in messages.
        skip_invalid: Drop bad records (reported) instead of raising at the first one.
        formats: The schemas to recognize.

    Returns:
        The format, and the index of every usable record, in order.

    Raises:
        DataFormatError: on the first bad record, or when skipping would drop more than
            ``MAX_INVALID_SHARE`` of the records, or when nothing is left.
    """
    fmt = detect_format(columns, source, formats)
    kept, problems = [], []
    total = 0
    for index, record in enumerate(records):
        total += 1
        problem = check_record(record, fmt, index, source)
        if problem is None:
            kept.append(index)
        elif not skip_invalid:
            raise DataFormatError(f"{problem}. Fix: correct the record, {SKIP_HINT}.")
        else:
            problems.append(problem)
    report_skipped(source, problems, total)
    if not kept:
        raise DataFormatError(f"{source}: no usable records.")
    logger.info("%s: %d records in %s format.", source, len(kept), fmt.name)
    return fmt, kept


def to_examples(
    records: Iterable[dict],
    columns: Iterable[str],
    source: str,
    *,
    skip_invalid: bool = False,
    formats: tuple[RecordFormat, ...] = INSTRUCTION_FORMATS,
) -> list[dict[str, str]]:
    """Check every record (``check_records``) and turn each usable one into ``{"prompt", "response"}``.

    Raises:
        DataFormatError: as ``check_records``.
    """
    records = records if isinstance(records, Sequence) else list(records)
    fmt, kept = check_records(records, columns, source, skip_invalid=skip_invalid, formats=formats)
    return [fmt.to_example(records[index]) for index in kept]


def instruction_segments(fmt: RecordFormat, eos: int) -> Callable[[dict, int], tuple[list[Segment], int]]:
    """Record -> ``prompt`` text, ``response`` text, EOS: the segments of completion and code data."""
    return partial(_instruction_segments, fmt.to_example, eos)


def _instruction_segments(to_example: Callable[[dict], dict[str, str]], eos: int, record: dict, index: int
                          ) -> tuple[list[Segment], int]:
    example = to_example(record)
    return [(example["prompt"], PROMPT), (example["response"], ANSWER), ([eos], END)], 0
