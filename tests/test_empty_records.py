"""Records with an empty text field: left out with one warning by default, refused with --strict_records.

Structurally broken records (a missing field, a wrong type) still stop the run; see test_validation.py.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from lmtune.cli import EXIT_USER_ERROR, main_clm
from lmtune.data.empty_records import SHOWN_IN_ERROR, find_empty_records
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.errors import DataFormatError

from conftest import write_jsonl

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
STRICT = RenderSettings(strict_records=True)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "empty text field" in
            r.getMessage()]


def test_empty_responses_are_left_out_counted_and_named_once(tokenizer, tmp_path, caplog):
    records = [dict(GOOD, instruction=f"q{i}") for i in range(12)]
    records[3]["output"] = ""
    records[7]["output"] = "  \n"
    records[9]["instruction"] = ""
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        prepared = prepare_data(tokenizer, train_file=str(path))
    assert prepared.stats["train"].kept == 9 and len(prepared.train) == 9
    assert warnings_of(caplog) == [
        f"{path}: left out 3 of 12 records with an empty text field (record 3 (line 4): field 'output' is empty; "
        "record 7 (line 8): field 'output' is empty; record 9 (line 10): field 'instruction' is empty); "
        "pass --strict_records to stop at them instead."
    ]


def test_strict_records_names_every_empty_record_up_to_the_limit(tokenizer, tmp_path):
    records = [dict(GOOD, output="" if i % 2 else "Blue.") for i in range(2 * SHOWN_IN_ERROR + 10)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataFormatError) as caught:
        prepare_data(tokenizer, train_file=str(path), settings=STRICT)
    message = str(caught.value)
    assert message.startswith(f"{path}: 25 of 50 records have an empty text field, which --strict_records refuses: "
                              "record 1: field 'output' is empty; record 3: field 'output' is empty; ")
    assert re.findall(r"record (\d+):", message) == [str(i) for i in range(1, 2 * SHOWN_IN_ERROR, 2)]
    assert message.endswith("; and 5 more. Fix: fill in or remove those records, or drop --strict_records to "
                            "leave them out.")


def test_a_later_broken_record_is_still_named_by_its_place_in_the_source(tokenizer, tmp_path):
    """Leaving records out must not shift the record numbers of the errors that follow; a parquet
    data set has no line numbers of its own."""
    import datasets

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    records = [GOOD, dict(GOOD, output=""), GOOD, dict(GOOD, output=None), GOOD]
    datasets.Dataset.from_list(records).to_parquet(hub_dir / "train.parquet")
    with pytest.raises(DataFormatError, match=r"hub: record 3: field 'output' is missing \(or null\)"):
        prepare_data(tokenizer, dataset_name=str(hub_dir))
    datasets.Dataset.from_list([r for r in records if r["output"] is not None]).to_parquet(hub_dir / "train.parquet")
    assert len(prepare_data(tokenizer, dataset_name=str(hub_dir)).train) == 3


def test_missing_fields_and_wrong_types_still_stop_the_run(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, dict(GOOD, output=""), {"instruction": "q", "input": ""}])
    with pytest.raises(DataFormatError, match=r"record 2 \(line 3\): field 'output' is missing \(or null\)"):
        prepare_data(tokenizer, train_file=str(path))
    path = write_jsonl(tmp_path / "types.jsonl", [GOOD, dict(GOOD, output=""), dict(GOOD, instruction=7)])
    with pytest.raises(DataFormatError, match=r"record 2 \(line 3\): field 'instruction' is a number"):
        prepare_data(tokenizer, train_file=str(path))


def test_all_records_empty_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [dict(GOOD, output="")] * 3)
    with pytest.raises(DataFormatError, match=r"all 3 records have an empty text field .*nothing is left to train"):
        prepare_data(tokenizer, train_file=str(path))


@pytest.mark.parametrize("task, records, expected", [
    ("chat", [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"}]},
              {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
              {"messages": []}],
     {1: "message 1: the assistant message is empty", 2: "the conversation is empty"}),
    ("chat", [{"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": ""},
                                 {"from": "gpt", "value": "A."}]}],
     {0: "message 1: the human message is empty"}),
    ("chat", [{"system": "", "question": "Q?", "chosen": ""}], {0: "field 'chosen' is empty"}),
    ("completion", [{"prompt": "", "completion": "text"}, {"prompt": "p", "completion": ""}],
     {1: "field 'completion' is empty"}),
    ("summarization", [{"article": "A.", "highlights": ""}], {0: "field 'highlights' is empty"}),
    ("completion", [{"unknown": ""}], {}),  # no known format: the renderer names the fields it found
])
def test_what_counts_as_empty(task, records, expected):
    import datasets

    columns = {key for record in records for key in record}
    dataset = datasets.Dataset.from_list([{key: record.get(key) for key in columns} for record in records])
    assert find_empty_records(dataset, task) == expected


def test_strict_records_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, dict(GOOD, output=""), GOOD, GOOD])
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(path), "--output_dir",
            str(tmp_path / "out"), "--do_train", "--dry_run", "--report_to", "none"]
    assert main_clm(argv) == 0
    assert main_clm(argv + ["--strict_records"]) == EXIT_USER_ERROR
    assert "1 of 4 records have an empty text field, which --strict_records refuses: record 1 (line 2): field " \
           "'output' is empty." in capsys.readouterr().err
