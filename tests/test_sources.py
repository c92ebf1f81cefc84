"""Stage 1: files, directories and splits are read as they are, and every record keeps its place."""

from __future__ import annotations

import json
import logging

import pytest

from lmtune.data.formats import to_examples
from lmtune.data.sources import (
    LOCATION_COLUMN,
    describe_value,
    load_file,
    load_hub_or_dir,
    load_splits,
    read_json_records,
    report_skipped,
)
from lmtune.errors import DataFormatError

from conftest import write_jsonl

GOOD = {"instruction": "Name a colour.", "output": "Blue."}


def test_layout_comes_from_the_content_not_the_suffix(tmp_path):
    (tmp_path / "array.jsonl").write_text(json.dumps([GOOD, GOOD], indent=2), encoding="utf-8")
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    assert [r[LOCATION_COLUMN] for r in read_json_records(tmp_path / "array.jsonl")] == ["record 0", "record 1"]
    assert [r[LOCATION_COLUMN] for r in read_json_records(tmp_path / "lines.json")] == [
        "record 0 (line 1)", "record 1 (line 2)"]


def test_a_field_only_later_records_have_is_kept(tmp_path):
    """``Dataset.from_list`` takes its columns from the first record alone; lmtune must not."""
    write_jsonl(tmp_path / "later.jsonl", [GOOD, {**GOOD, "input": "Sky"}])
    dataset = load_file(tmp_path / "later.jsonl")
    assert dataset["input"] == [None, "Sky"]
    assert "### Input:\nSky" in to_examples(dataset, dataset.column_names, "later")[1]["prompt"]


def test_shared_alpaca_file_loads_whole(shared_data):
    path = shared_data / "alpaca" / "alpaca_data_first2000.json"
    dataset = load_file(path)
    assert len(dataset) == 2000
    assert dataset[1999][LOCATION_COLUMN] == "record 1999"
    assert dataset[0]["instruction"] == json.loads(path.read_text(encoding="utf-8"))[0]["instruction"]


def test_held_out_records_are_named_by_their_place_in_the_file(tmp_path):
    records = [dict(GOOD, instruction=f"q{i}") for i in range(20)]
    records[13]["output"] = ""
    write_jsonl(tmp_path / "train.jsonl", records)
    splits = load_splits(train_file=str(tmp_path / "train.jsonl"), validation_split_percentage=50, seed=3)
    held = next(name for name in ("train", "validation") if "q13" in splits[name]["instruction"])
    with pytest.raises(DataFormatError, match=r"record 13 \(line 14\): field 'output' is empty"):
        to_examples(splits[held], splits[held].column_names, "train.jsonl")


def test_text_files(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    assert load_file(tmp_path / "corpus.txt")["text"] == ["first line", "second line"]
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"blank\.txt: the file is empty; expected one text per line\."):
        load_file(tmp_path / "blank.txt")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"--train_file .*data\.xml: unsupported file type '\.xml'; allowed: "
                                              r"json, jsonl, csv, parquet, txt\."):
        load_file(tmp_path / "data.xml")


def test_dataset_directory_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3)
    write_jsonl(tmp_path / "test.jsonl", [GOOD] * 2)
    splits = load_hub_or_dir(str(tmp_path))
    assert (len(splits["train"]), len(splits["validation"])) == (3, 2)
    with pytest.raises(DataFormatError, match=r"split 'dev' for --validation_split does not exist; available: "):
        load_hub_or_dir(str(tmp_path), validation_split="dev")
    with pytest.raises(DataFormatError, match=r"--dataset_name .*missing: cannot be loaded"):
        load_hub_or_dir(str(tmp_path / "missing"))


def test_hub_stand_in_trains_on_train_sft(shared_data):
    splits = load_hub_or_dir(str(shared_data / "hub" / "HuggingFaceH4" / "ultrachat_200k"))
    assert splits["train"].split == "train_sft" and splits["validation"].split == "test_sft"


def test_skip_report_lists_five_and_counts_the_rest(caplog):
    problems = [f"f: record {i}: field 'output' is empty" for i in range(7)]
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        report_skipped("f", problems, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"skipped: {p}" for p in problems[:5]]
    assert lines[5] == "f: skipped 7 invalid records of 100 (7.0%) (2 more not shown)."
    with pytest.raises(DataFormatError, match=r"f: 11 of 100 records are invalid \(11%, more than the 10% "
                                              r"--skip_invalid_records accepts\)"):
        report_skipped("f", problems + problems[:4], 100)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "null"), ("hi", 'a string ("hi")'), (3.5, "a number (3.5)"), ([1], "a list ([1])"),
     ({"a": 1}, 'an object ({"a": 1})'), ("x" * 100, 'a string ("' + "x" * 58 + "…)")],
)
def test_describe_value(value, expected):
    assert describe_value(value) == expected
