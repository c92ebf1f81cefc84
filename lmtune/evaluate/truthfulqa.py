"""TruthfulQA questions from any of their public forms: ``mc_task.json``, ``TruthfulQA.csv`` or the hub.

Stage contract: a path (or nothing, for the hub data set) in, ``MCQuestion`` items out, ready for
``lmtune.evaluate.multiple_choice.score_truthfulqa``.

``mc_task.json`` and the hub's ``truthfulqa/truthful_qa`` (``multiple_choice``) hold the MC1/MC2
answer sets lm-evaluation-harness scores. ``TruthfulQA.csv`` holds the answers as text; from it the
sets are built the way the TruthfulQA authors' own code scores the CSV (``truthfulqa/models.py``,
``MC_calcs``, with ``split_multi_answer``/``format_best`` from ``utilities.py``):

- answers are split at ``;``, stripped, and given a final period when they lack one;
- MC1: the ``Best Answer`` (true) against every ``Incorrect Answers`` entry (false);
- MC2: every ``Correct Answers`` entry (true) against every ``Incorrect Answers`` entry (false),
  scored as the normalized probability mass on the true ones.

These sets are not those of ``mc_task.json`` (its MC1 lists fewer false answers), so CSV scores are
comparable with the TruthfulQA paper's MC numbers, not with lm-eval's ``truthfulqa_mc1``. Rows
without a question, best answer, correct or incorrect answers are skipped with a warning, as
the authors' code skips them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate.multiple_choice import MCQuestion, load_truthfulqa_mc

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
HUB_DATASET = ("truthfulqa/truthful_qa", "multiple_choice")


def split_answers(text: str) -> list[str]:
    """``"A; B."`` -> ``["A.", "B."]``: the authors' ``split_multi_answer``."""
    return [_close(part) for part in text.split(";") if part.strip()]


def _close(answer: str) -> str:
    """The authors' ``format_best``: stripped, ending in a period."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def question_from_row(row: dict[str, str]) -> MCQuestion | None:
    """One CSV row as MC1/MC2 answer sets (see the module docstring); None when answers are missing."""
    question = (row.get("Question") or "").strip()
    best = (row.get("Best Answer") or "").strip()
    true, false = split_answers(row.get("Correct Answers") or ""), split_answers(row.get("Incorrect Answers") or "")
    if not (question and best and true and false):
        return None
    best = _close(best)
    return MCQuestion(
        question=question,
        mc1_choices=(best, *false), mc1_labels=(1,) + (0,) * len(false),
        mc2_choices=(*true, *false), mc2_labels=(1,) * len(true) + (0,) * len(false),
    )


def load_truthfulqa_csv(path: str | Path) -> list[MCQuestion]:
    """Read ``TruthfulQA.csv`` (817-question v1 or the 790-question 2025 revision).

    Raises:
        DataFormatError: if the file is missing, lacks a needed column, or yields no question.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:  # the v1 file starts with a BOM
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataFormatError(
                    f"{path}: missing column(s) {missing}; TruthfulQA.csv has {list(CSV_COLUMNS)} "
                    f"(found {reader.fieldnames})."
                )
            rows = list(reader)
    except FileNotFoundError as err:
        raise DataFormatError(f"TruthfulQA file not found: {path}. Pass mc_task.json or TruthfulQA.csv.") from err
    questions = [question_from_row(row) for row in rows]
    skipped = [index for index, q in enumerate(questions) if q is None]
    if skipped:
        logger.warning("%s: skipped %d row(s) without question or answers (first: row %d).",
                       path, len(skipped), skipped[0] + 2)
    kept = [q for q in questions if q is not None]
    if not kept:
        raise DataFormatError(f"{path}: no row has a question with best, correct and incorrect answers.")
    return kept


def load_truthfulqa_hub(cache_dir: str | None = None) -> list[MCQuestion]:
    """The hub data set lm-eval reads (``truthfulqa/truthful_qa``, ``multiple_choice``, validation).

    Raises:
        ConfigError: when the data set cannot be loaded (offline machine, no hub access).
    """
    import datasets

    try:
        rows = datasets.load_dataset(*HUB_DATASET, split="validation", cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types (connection, not found, offline mode)
        raise ConfigError(
            f"TruthfulQA: the hub data set {HUB_DATASET[0]} ({HUB_DATASET[1]}) cannot be loaded ({err}). "
            "Pass --truthfulqa_file with a local mc_task.json or TruthfulQA.csv."
        ) from err
    return [
        MCQuestion(
            question=row["question"],
            mc1_choices=tuple(row["mc1_targets"]["choices"]), mc1_labels=tuple(row["mc1_targets"]["labels"]),
            mc2_choices=tuple(row["mc2_targets"]["choices"]), mc2_labels=tuple(row["mc2_targets"]["labels"]),
        )
        for row in rows
    ]


def load_truthfulqa(path: str | Path | None, *, cache_dir: str | None = None) -> list[MCQuestion]:
    """TruthfulQA questions from ``mc_task.json``, ``TruthfulQA.csv``, a folder holding either, or the hub.

    Args:
        path: The file or folder; None loads the hub data set.
        cache_dir: Hub cache directory.

    Raises:
        DataFormatError: for a missing or malformed file.
        ConfigError: when the hub data set is needed and cannot be loaded.
    """
    if path is None:
        return load_truthfulqa_hub(cache_dir)
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("mc_task.json", "TruthfulQA.csv") if (path / name).is_file()]
        if not found:
            raise DataFormatError(f"--truthfulqa_file {path}: the folder holds neither mc_task.json nor TruthfulQA.csv.")
        path = found[0]
    if path.suffix.lower() == ".csv":
        return load_truthfulqa_csv(path)
    return load_truthfulqa_mc(path)
