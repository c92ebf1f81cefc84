"""Stage 1 of the data flow: read raw records from files, local dataset directories or the hub.

Contract: ``load_splits`` returns ``{split_name: datasets.Dataset}`` holding the records as
they are in the source; nothing is tokenized or reformatted here. JSON and JSONL files are
read by hand because ``datasets`` reports a broken line without its line number, accepts
undecodable bytes until they are read, and says ``StopIteration`` for an empty file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from lmtune.errors import DataFormatError

logger = logging.getLogger(__name__)

TRAIN_SPLIT_CANDIDATES = ("train", "train_sft")
VALIDATION_SPLIT_CANDIDATES = ("validation", "valid", "val", "test_sft", "test")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFormatError(
            f"{path}: line {line}, column {column}: byte 0x{raw[err.start]:02x} is not valid UTF-8. "
            "Re-save the file as UTF-8 (it looks like cp1252/latin-1 text)."
        ) from err


def read_json_records(path: str | Path) -> list[dict]:
    """Read a JSON array of objects, or JSON Lines, into a list of dicts.

    Raises:
        DataFormatError: naming the file and line for syntax errors, undecodable bytes,
            an empty file, or an entry that is not an object.
    """
    path = Path(path)
    text = _decode(path)
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty; expected instruction records.")
    records: list = []
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}). "
                    "Each line of a .jsonl file must be one complete JSON object."
                ) from err
            if not isinstance(records[-1], dict):
                raise DataFormatError(f"{path}: line {number} is a {type(records[-1]).__name__}, expected an object.")
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                " (is the file truncated?)."
            ) from err
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: record {index} is a {type(record).__name__}, expected an object.")
    if not records:
        raise DataFormatError(f"{path}: holds no records.")
    return records


def _check_columns_consistent(path: Path, records: list[dict]) -> None:
    """Arrow needs one type per column; say which record breaks that instead of an Arrow error."""
    seen: dict[str, tuple[type, int]] = {}
    for index, record in enumerate(records):
        for key, value in record.items():
            if value is None:
                continue
            kind = type(value)
            if key in seen and seen[key][0] is not kind:
                first_kind, first_index = seen[key]
                raise DataFormatError(
                    f"{path}: record {index}, field '{key}' is a {kind.__name__} but record {first_index} "
                    f"has a {first_kind.__name__}; every record must use the same type for '{key}'."
                )
            seen.setdefault(key, (kind, index))


def load_file(path: str | Path) -> datasets.Dataset:
    """Load one local data file as a ``datasets.Dataset`` (json, jsonl, csv, parquet or txt).

    A ``.txt`` file gives one record per non-empty line in a ``text`` column.

    Raises:
        DataFormatError: if the file is missing, unreadable, empty or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        records = read_json_records(path)
        _check_columns_consistent(path, records)
        return datasets.Dataset.from_list(records)
    if suffix == ".txt":
        lines = [line for line in _decode(path).splitlines() if line.strip()]
        if not lines:
            raise DataFormatError(f"{path}: the file is empty; expected one text per line.")
        return datasets.Dataset.from_dict({"text": lines})
    if suffix in (".csv", ".parquet"):
        if path.stat().st_size == 0:
            raise DataFormatError(f"{path}: the file is empty.")
        builder = "csv" if suffix == ".csv" else "parquet"
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # pyarrow and pandas raise many types; all mean "unreadable"
            raise DataFormatError(f"{path}: cannot be read as {builder}: {err}") from err
        if len(dataset) == 0:
            raise DataFormatError(f"{path}: holds no records.")
        return dataset
    raise DataFormatError(f"{path}: unsupported file type '{suffix}'; use json, jsonl, csv, parquet or txt.")


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
) -> dict[str, datasets.Dataset]:
    """Load the train and validation records from wherever the user pointed.

    With ``validation_split_percentage`` > 0 and no other validation source, that share of
    the training records (shuffled with ``seed``) is held out.

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
        splits["train"] = load_file(train_file)
    if validation_file:
        splits["validation"] = load_file(validation_file)
    if "validation" not in splits and validation_split_percentage > 0 and "train" in splits:
        held = splits["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        splits["train"], splits["validation"] = held["train"], held["test"]
    return splits
