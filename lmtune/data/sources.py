"""Stage 1 of the data flow: read raw records from files, local dataset directories or the hub.

Contract: ``load_splits`` returns ``{split_name: datasets.Dataset}`` holding the records as
they are in the source; nothing is tokenized or reformatted here. JSON and JSON Lines files
are read by hand (``json_records.py``) because ``datasets`` reports a broken line without its
line number, accepts undecodable bytes until they are read, says ``StopIteration`` for an empty
file, and cannot hold a column whose type changes between records. Every problem found names
the file, the line or record, what was expected and the fix. Records read from a JSON file
carry their position in the file in ``LOCATION_COLUMN`` (``record 10 (line 11)``), so later
stages can name it after shuffling or skipping.

With ``skip_invalid`` a bad line or record is not dropped here but kept as a row whose
``PROBLEM_COLUMN`` says what is wrong (and whose bad field is null), so that stage 2 drops,
counts and reports every kind of bad record in one place, against one limit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from lmtune.data.json_records import (  # the record helpers are re-exported for later stages
    LOCATION_COLUMN,
    PROBLEM_COLUMN,
    SKIP_HINT,
    consistent_records,
    decode_utf8,
    describe_value,
    read_json_records,
    record_location,
)
from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

__all__ = [
    "LOCATION_COLUMN", "MAX_INVALID_SHARE", "PROBLEM_COLUMN", "SKIP_HINT", "describe_value", "load_file",
    "load_hub_or_dir", "load_splits", "read_json_records", "record_location", "report_skipped", "source_problem",
]

TRAIN_SPLIT_CANDIDATES = ("train", "train_sft")
VALIDATION_SPLIT_CANDIDATES = ("validation", "valid", "val", "test_sft", "test")
# Share of bad records above which --skip_invalid_records still refuses to train.
MAX_INVALID_SHARE = 0.1
_SHOWN_PROBLEMS = 5


def source_problem(record: dict) -> str | None:
    """What stage 1 found wrong with a record kept for ``--skip_invalid_records``, or None."""
    return record.get(PROBLEM_COLUMN)


def report_skipped(source: str, problems: list[str], total: int, what: str = "records") -> None:
    """Log what ``--skip_invalid_records`` dropped, or refuse when too much of the data is bad.

    Raises:
        DataFormatError: when more than ``MAX_INVALID_SHARE`` of ``total`` was dropped.
    """
    if not problems:
        return
    share = len(problems) / max(total, 1)
    if share > MAX_INVALID_SHARE:
        raise DataFormatError(
            f"{source}: {len(problems)} of {total} {what} are invalid ({share:.0%}, more than the "
            f"{MAX_INVALID_SHARE:.0%} --skip_invalid_records accepts); this looks like the wrong file or schema. "
            f"First: {problems[0]}. Fix the data."
        )
    for problem in problems[:_SHOWN_PROBLEMS]:
        logger.warning("skipped: %s", problem)
    more = f" ({len(problems) - _SHOWN_PROBLEMS} more not shown)" if len(problems) > _SHOWN_PROBLEMS else ""
    logger.warning("%s: skipped %d invalid %s of %d (%.1f%%)%s.", source, len(problems), what, total,
                   100 * share, more)


def load_file(path: str | Path, *, skip_invalid: bool = False, flag: str = "--train_file") -> datasets.Dataset:
    """Load one local data file as a ``datasets.Dataset`` (json, jsonl, csv, parquet or txt).

    A ``.txt`` file gives one record per non-empty line in a ``text`` column.

    Args:
        path: The file.
        skip_invalid: Keep unreadable lines and records whose field types differ from the other
            records as rows marked with ``PROBLEM_COLUMN`` (stage 2 skips and reports them),
            instead of raising.
        flag: The flag that named the file, for messages.

    Raises:
        DataFormatError: if the file is missing, a directory, unreadable, empty or malformed.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{flag} {path}: is a directory; expected a data file. Fix: name a file, or pass a "
                              "dataset directory as --dataset_name DIR.")
    if not path.is_file():
        raise DataFormatError(f"{flag} {path}: no such file. Fix: check the path (relative paths start at "
                              f"{Path.cwd()}).")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        records = consistent_records(path, read_json_records(path, skip_invalid=skip_invalid), skip_invalid)
        # Dataset.from_list takes its columns from the first record alone; a field that only
        # later records have would vanish without a word.
        columns = list(dict.fromkeys(key for record in records for key in record))
        return datasets.Dataset.from_dict({key: [record.get(key) for record in records] for key in columns})
    if suffix == ".txt":
        lines = [line for line in decode_utf8(path, path.read_bytes()).splitlines() if line.strip()]
        if not lines:
            raise DataFormatError(f"{path}: the file is empty; expected one text per line.")
        return datasets.Dataset.from_dict({"text": lines})
    if suffix in (".csv", ".parquet"):
        return _load_table(path, "csv" if suffix == ".csv" else "parquet")
    raise DataFormatError(f"{flag} {path}: unsupported file type '{suffix}'; allowed: json, jsonl, csv, parquet, txt.")


def _load_table(path: Path, builder: str) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty (0 bytes); expected a {builder} table with a header.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # pyarrow and pandas raise many types; all mean "unreadable"
        cause = err.__cause__ or err
        raise DataFormatError(f"{path}: cannot be read as {builder}: {type(cause).__name__}: {cause}. "
                              f"Fix: check that the file is a valid {builder} file.") from err
    if len(dataset) == 0:
        raise DataFormatError(f"{path}: holds no records (a header only); expected at least one row.")
    return dataset


def _pick(available: list[str], requested: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if requested:
        if requested not in available:
            raise DataFormatError(f"split '{requested}' for {what} does not exist; available: {', '.join(available)}.")
        return requested
    return next((name for name in candidates if name in available), None)


def load_hub_or_dir(
    name: str,
    config_name: str | None = None,
    *,
    train_split: str | None = None,
    validation_split: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
    streaming: bool = False,
) -> dict[str, datasets.Dataset]:
    """Load a dataset by hub id or local directory and pick its train and validation splits.

    Split names are kept as the source has them (ultrachat's ``train_sft`` is trained on,
    ``train_gen`` is never substituted for it); pass ``train_split``/``validation_split`` to choose.

    Returns:
        ``{"train": ..., "validation": ...}`` with the validation entry only when one exists.

    Raises:
        DataFormatError: if the dataset cannot be loaded or has no usable split.
    """
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir, token=token, streaming=streaming)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        hint = "" if Path(name).exists() else " For a hub id, check the name and your network/HF_TOKEN."
        raise DataFormatError(f"--dataset_name {name}: cannot be loaded: {err}.{hint}") from err
    available = list(loaded.keys())
    train = _pick(available, train_split, TRAIN_SPLIT_CANDIDATES, "--train_split")
    validation = _pick(available, validation_split, VALIDATION_SPLIT_CANDIDATES, "--validation_split")
    if train is None and validation is None:
        raise DataFormatError(
            f"--dataset_name {name}: no train split among {', '.join(available)}; name one with --train_split."
        )
    splits = {}
    if train is not None:
        splits["train"] = loaded[train]
        logger.info("Training on split '%s' of %s.", train, name)
    if validation is not None:
        splits["validation"] = loaded[validation]
        logger.info("Validating on split '%s' of %s.", validation, name)
    return splits


def load_splits(
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str | None = None,
    validation_split: str | None = None,
    validation_split_percentage: int = 0,
    seed: int = 42,
    cache_dir: str | None = None,
    token: str | None = None,
    streaming: bool = False,
    skip_invalid: bool = False,
) -> dict[str, datasets.Dataset]:
    """Load the train and validation records from wherever the user pointed.

    With ``validation_split_percentage`` > 0 and no other validation source, that share of
    the training records (shuffled with ``seed``) is held out. ``skip_invalid`` skips
    unreadable lines of local files (see ``load_file``).

    Returns:
        ``{"train": Dataset, "validation": Dataset}``, either key may be absent.
    """
    splits: dict[str, datasets.Dataset] = {}
    if dataset_name:
        splits = load_hub_or_dir(
            dataset_name,
            dataset_config_name,
            train_split=train_split,
            validation_split=validation_split,
            cache_dir=cache_dir,
            token=token,
            streaming=streaming,
        )
    if train_file:
        splits["train"] = load_file(train_file, skip_invalid=skip_invalid, flag="--train_file")
    if validation_file:
        splits["validation"] = load_file(validation_file, skip_invalid=skip_invalid, flag="--validation_file")
    if "validation" not in splits and validation_split_percentage > 0 and "train" in splits:
        held = splits["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        splits["train"], splits["validation"] = held["train"], held["test"]
    return splits
