"""Stage 2 of the data flow: raw records -> prompt/response examples.

A record's format is recognized from its fields, never from the file or dataset name
(the reference accepted only names containing "alpaca"). The prompt texts are the
reference's, word for word. Every record is checked here, with its index, before any
model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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

# Share of bad records above which --skip_invalid_records still refuses to train.
MAX_INVALID_SHARE = 0.1


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


# Detection order matters: the first format whose required fields are all present wins.
INSTRUCTION_FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("alpaca", ("instruction", "output"), ("input",), _alpaca),
    RecordFormat("question-answer", ("question", "response"), (), _question_answer),
    RecordFormat("prompt-completion", ("prompt", "completion"), (), _prompt_completion),
    RecordFormat("text", ("text",), (), _plain_text),
)


def detect_format(columns: Iterable[str], source: str, formats: tuple[RecordFormat, ...] = INSTRUCTION_FORMATS
                  ) -> RecordFormat:
    """Pick the record format from the column names.

    Raises:
        DataFormatError: naming the columns found and the schemas accepted.
    """
    present = set(columns)
    for fmt in formats:
        if set(fmt.required) <= present:
            return fmt
    accepted = "; ".join(f"{f.name}: {', '.join(f.required + f.optional)}" for f in formats)
    raise DataFormatError(
        f"{source}: records have fields {sorted(present)}, which match no known format. Accepted: {accepted}."
    )


def check_record(record: dict, fmt: RecordFormat, index: int, source: str) -> str | None:
    """Return what is wrong with one record, or None when it is usable."""
    for name in fmt.required:
        value = record.get(name)
        if value is None:
            return f"{source}: record {index}: field '{name}' is missing; {fmt.name} records need {fmt.required}"
        if not isinstance(value, str):
            return f"{source}: record {index}: field '{name}' is a {type(value).__name__}, expected a string"
        if not value.strip() and name != "prompt":
            return f"{source}: record {index}: field '{name}' is empty"
    for name in fmt.optional:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"{source}: record {index}: field '{name}' is a {type(value).__name__}, expected a string"
    return None


def to_examples(
    records: Iterable[dict],
    columns: Iterable[str],
    source: str,
    *,
    skip_invalid: bool = False,
    formats: tuple[RecordFormat, ...] = INSTRUCTION_FORMATS,
) -> list[dict[str, str]]:
    """Check every record and turn it into ``{"prompt", "response"}``.

    Args:
        records: Raw records (dicts).
        columns: Their column names, for format detection.
        source: File or dataset name, used in messages.
        skip_invalid: Drop bad records (reported) instead of raising at the first one.
        formats: The schemas to recognize.

    Returns:
        One example per usable record, in order.

    Raises:
        DataFormatError: on the first bad record, or when skipping would drop more than
            ``MAX_INVALID_SHARE`` of the records, or when nothing is left.
    """
    fmt = detect_format(columns, source, formats)
    examples, problems = [], []
    total = 0
    for index, record in enumerate(records):
        total += 1
        problem = check_record(record, fmt, index, source)
        if problem is None:
            examples.append(fmt.to_example(record))
        elif not skip_invalid:
            raise DataFormatError(problem + ". Fix the record, or pass --skip_invalid_records to drop bad records.")
        else:
            problems.append(problem)
    if problems:
        share = len(problems) / total
        for problem in problems[:5]:
            logger.warning("skipped: %s", problem)
        if share > MAX_INVALID_SHARE:
            raise DataFormatError(
                f"{source}: {len(problems)} of {total} records are invalid ({share:.0%}, more than "
                f"{MAX_INVALID_SHARE:.0%}); this looks like the wrong file or schema. First: {problems[0]}"
            )
        logger.warning("%s: skipped %d invalid record(s) of %d.", source, len(problems), total)
    if not examples:
        raise DataFormatError(f"{source}: no usable records.")
    logger.info("%s: %d records in %s format.", source, len(examples), fmt.name)
    return examples
