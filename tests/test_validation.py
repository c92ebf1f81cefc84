"""Bad input is rejected before the model loads, naming file, line/record, field, expectation and fix.

The shared broken files (``../shared/data/files/bad``, see its README) are each checked with the
exact position the README gives; the cases after them go beyond that set.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from lmtune.cli import EXIT_USER_ERROR, main_clm
from lmtune.data.formats import to_examples
from lmtune.data.prepare import TASK_RENDERERS, RenderSettings, prepare_data
from lmtune.data.sources import load_file
from lmtune.errors import DataFormatError

from conftest import write_jsonl

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def bad(shared_data: Path, name: str) -> Path:
    return shared_data / "files" / "bad" / name


def examples_of(path: Path, *, skip_invalid: bool = False) -> list[dict[str, str]]:
    """Stage 1 + stage 2, as ``prepare_data`` runs them for --task completion."""
    dataset = load_file(path, skip_invalid=skip_invalid)
    return to_examples(dataset, dataset.column_names, str(path), skip_invalid=skip_invalid)


# --- the shared broken files ----------------------------------------------------------------

SHARED_CASES = {
    "truncated.json": r"truncated\.json: record 6: Unterminated string starting at line 35, column 19; the file "
                      r"ends before its JSON array is closed, so it looks truncated \(records 0-5 are complete\)\. "
                      r"Fix: restore the whole file\.",
    "malformed_line.jsonl": r"malformed_line\.jsonl: line 11, column 257: not valid JSON \(Expecting ',' delimiter\); "
                            r"expected one complete JSON object per line\. Fix: repair that line",
    "missing_output.json": r"missing_output\.json: record 3: field 'output' is missing \(or null\); expected a string "
                           r"\(alpaca records have instruction, output, and optionally input\)\. Fix: correct the "
                           r"record, or pass --skip_invalid_records",
    "wrong_types.json": r"wrong_types\.json: record 2: field 'instruction' is a list "
                        r"\(\[\"Describe the structure of an atom\.\"\]\); expected a string, as in 9 other records\. "
                        r"Fix: give that field the same type in every record",
    "empty.json": r"empty\.json: the file is empty \(0 bytes\); expected a JSON array of records or one JSON object "
                  r"per line\. Fix:",
    "empty.jsonl": r"empty\.jsonl: the file is empty \(0 bytes\)",
    "empty_array.json": r"empty_array\.json: holds no records \(an empty array\); expected at least one record\.",
    "non_utf8.jsonl": r"non_utf8\.jsonl: line 4, column 292: byte 0x92 is not valid UTF-8; expected UTF-8 text\. "
                      r"Fix: re-save the file as UTF-8",
}


@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_bad_file_is_rejected_with_its_position(shared_data, name):
    with pytest.raises(DataFormatError, match=SHARED_CASES[name]):
        examples_of(bad(shared_data, name))


def test_wrong_types_second_defect_is_named_too(shared_data, tmp_path):
    records = json.loads(bad(shared_data, "wrong_types.json").read_text(encoding="utf-8"))
    records[2]["instruction"] = records[2]["instruction"][0]  # repair the first defect
    path = tmp_path / "wrong_types_fixed_first.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"record 5: field 'output' is missing \(or null\); expected a string"):
        examples_of(path)


@pytest.mark.parametrize(
    ("name", "line", "role_problem"),
    [
        ("chat_roles_not_alternating.jsonl", 5, r"record 4( \(line 5\))?: message 1: expected role 'assistant' "
                                                r"but found 'user'"),
        ("chat_unknown_role.jsonl", 6, r"record 5( \(line 6\))?: message 2: role 'narrator' is not allowed; "
                                       r"allowed: system, user, assistant"),
    ],
)
def test_shared_bad_chat_files(shared_data, tokenizer, name, line, role_problem):
    if "chat" not in TASK_RENDERERS:
        pytest.skip("--task chat is not built in this checkout")
    with pytest.raises(DataFormatError, match=re.escape(name) + ": " + role_problem):
        prepare_data(tokenizer, task="chat", train_file=str(bad(shared_data, name)))


def test_long_prompt_is_counted_and_reported(shared_data, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lmtune"):
        prepared = prepare_data(
            tokenizer, train_file=str(bad(shared_data, "long_prompt.json")), settings=RenderSettings(max_seq_length=512)
        )
    stats = prepared.stats["train"]
    assert (stats.kept, stats.dropped_long_prompt, stats.dropped_indices) == (2, 1, [1])
    assert len(prepared.train) == 2
    report = [r for r in caplog.records if r.levelno == logging.WARNING and "long_prompt.json" in r.getMessage()]
    assert len(report) == 1
    assert re.search(r"train \(.*long_prompt\.json\): 2 samples, .* 1 dropped \(prompt too long\)\.",
                     report[0].getMessage())


# --- --skip_invalid_records -----------------------------------------------------------------

def test_skip_malformed_line_reports_it(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        examples = examples_of(bad(shared_data, "malformed_line.jsonl"), skip_invalid=True)
    assert len(examples) == 19
    assert "How did Julius Caesar die?" not in "".join(e["prompt"] for e in examples)
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"skipped: .*malformed_line\.jsonl: line 11, column 257: not valid JSON", m) for m in messages)
    assert any(re.search(r"malformed_line\.jsonl: skipped 1 invalid records of 20 \(5\.0%\)", m) for m in messages)


def test_skip_undecodable_line_reports_it(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        examples = examples_of(bad(shared_data, "non_utf8.jsonl"), skip_invalid=True)
    assert len(examples) == 9
    assert all("Rewrite the given paragraph" not in e["prompt"] for e in examples)
    assert any("skipped: " in r.getMessage() and "line 4, column 292: byte 0x92" in r.getMessage()
               for r in caplog.records)


def test_skip_refuses_beyond_the_limit(shared_data):
    # Two bad records of ten: one a list (stage 1, type) and one null (stage 2), counted together.
    with pytest.raises(DataFormatError, match=r"wrong_types\.json: 2 of 10 records are invalid \(20%, more than the "
                                              r"10% --skip_invalid_records accepts\); this looks like the wrong file"):
        examples_of(bad(shared_data, "wrong_types.json"), skip_invalid=True)
    with pytest.raises(DataFormatError, match=r"missing_output\.json: 2 of 10 records are invalid \(20%"):
        examples_of(bad(shared_data, "missing_output.json"), skip_invalid=True)


def test_skip_counts_every_kind_of_bad_record_once(tmp_path, caplog):
    lines = [json.dumps(GOOD)] * 27 + ['{"instruction": "x", "output": ', json.dumps({**GOOD, "output": ["no"]}),
                                       json.dumps({**GOOD, "output": ""})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert len(examples_of(path, skip_invalid=True)) == 27
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped: ")]
    assert [re.search(r"(line \d+)", m).group(1) for m in skipped] == ["line 28", "line 29", "line 30"]
    assert "field 'output' is a list ([\"no\"]); expected a string, as in 28 other records" in skipped[1]
    assert "field 'output' is empty" in skipped[2]


# --- beyond the shared set ------------------------------------------------------------------

def test_utf8_bom_and_crlf_are_read_transparently(tmp_path):
    records = [GOOD, {**GOOD, "output": "Red."}]
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=2).replace("\n", "\r\n").encode("utf-8"))
    lines = tmp_path / "bom_crlf.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in records).encode("utf-8"))
    for path in (array, lines):
        dataset = load_file(path)
        assert [row["output"] for row in dataset] == ["Blue.", "Red."]
        assert "instruction" in dataset.column_names  # not "\ufeffinstruction"


def test_utf16_file_is_named(tmp_path):
    path = tmp_path / "utf16.json"
    path.write_bytes(json.dumps([GOOD]).encode("utf-16"))
    with pytest.raises(DataFormatError, match=r"utf16\.json: the file is UTF-16 encoded; expected UTF-8\. Fix: re-save"):
        load_file(path)


def test_undecodable_byte_in_json_array_names_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"instruction": "Caf\xe9?", "output": "Yes."}\n]\n')
    with pytest.raises(DataFormatError, match=r"latin1\.json: line 2, column 23: byte 0xe9 is not valid UTF-8"):
        load_file(path, skip_invalid=True)  # a broken array cannot be skipped past


def test_blank_lines_keep_line_numbers_right(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), "", "   ", json.dumps({"instruction": "x"})]) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"blank\.jsonl: record 1 \(line 4\): field 'output' is missing"):
        examples_of(path)


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "u2028.jsonl"
    path.write_text(json.dumps({**GOOD, "output": "a\u2028b\u0085c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert examples_of(path)[0]["response"] == "a\u2028b\u0085c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"text": "Blue."}, r"record 1: field 'output' is an object \(\{\"text\": \"Blue\.\"\}\); expected a string, "
                            r"as in 3 other records"),
        (5, r"record 1: field 'output' is a number \(5\); expected a string, as in 3 other records"),
        (True, r"record 1: field 'output' is true/false \(true\); expected a string, as in 3 other records"),
    ],
)
def test_one_record_of_another_type(tmp_path, value, expected):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "output": value}, GOOD, GOOD]), encoding="utf-8")
    with pytest.raises(DataFormatError, match=expected):
        examples_of(path)


def test_the_odd_record_is_named_even_when_it_comes_first(tmp_path):
    path = tmp_path / "first_odd.json"
    path.write_text(json.dumps([{**GOOD, "instruction": 7}, GOOD, GOOD]), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"record 0: field 'instruction' is a number \(7\); expected a string"):
        examples_of(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"text": "Blue."}, r"record 0 \(line 1\): field 'output' is an object \(\{\"text\": \"Blue\.\"\}\); expected a string$"),
        (42, r"record 0 \(line 1\): field 'output' is a number \(42\); expected a string$"),
        ("  ", r"record 0 \(line 1\): field 'output' is empty; expected text to learn$"),
    ],
)
def test_every_record_of_the_wrong_type(tmp_path, value, expected):
    write_jsonl(tmp_path / "all.jsonl", [{**GOOD, "output": value}] * 3)
    with pytest.raises(DataFormatError, match=expected.replace("$", r"\. Fix: correct the record")):
        examples_of(tmp_path / "all.jsonl")


def test_nested_mismatch_is_named_by_path(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 3 + [{"messages": [{"role": "user", "content": 5}]}]
    write_jsonl(tmp_path / "nested.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"record 3 \(line 4\): field 'messages\[\]\.content' is a number; "
                                              r"expected a string, as in the records before it"):
        load_file(tmp_path / "nested.jsonl")


def test_unknown_fields_name_the_closest_format(tmp_path):
    write_jsonl(tmp_path / "answer.jsonl", [{"instruction": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"answer\.jsonl: the records have fields \['answer', 'instruction'\], "
                                              r"which match no known format\. Closest: alpaca, which also needs "
                                              r"'output'\. Expected one of: alpaca \(instruction, output, input\)"):
        examples_of(tmp_path / "answer.jsonl")


def test_csv_with_a_missing_column_and_an_empty_cell(tmp_path):
    (tmp_path / "no_output.csv").write_text("instruction,input\nName a colour.,\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"no_output\.csv: the records have fields \['input', 'instruction'\]"
                                              r".* Closest: alpaca, which also needs 'output'"):
        examples_of(tmp_path / "no_output.csv")
    (tmp_path / "hole.csv").write_text("instruction,input,output\na,,b\nc,,\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"hole\.csv: record 1: field 'output' is missing \(or null\)"):
        examples_of(tmp_path / "hole.csv")


def test_ragged_csv_is_unreadable_with_the_reason(tmp_path):
    (tmp_path / "ragged.csv").write_text("instruction,output\na,b\nc,d,e,f\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"ragged\.csv: cannot be read as csv: .*Expected 2 fields in line 3"):
        load_file(tmp_path / "ragged.csv")


def test_parquet_good_wrong_type_and_corrupt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), tmp_path / "good.parquet")
    assert [e["response"] for e in examples_of(tmp_path / "good.parquet")] == ["x", "y"]
    pq.write_table(pa.table({"instruction": ["a"], "output": [3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataFormatError, match=r"ints\.parquet: record 0: field 'output' is a number \(3\)"):
        examples_of(tmp_path / "ints.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataFormatError, match=r"corrupt\.parquet: cannot be read as parquet: "):
        load_file(tmp_path / "corrupt.parquet")


def test_directory_and_missing_file(tmp_path):
    (tmp_path / "data.json").mkdir()
    with pytest.raises(DataFormatError, match=r"--train_file .*data\.json: is a directory; expected a data file\. "
                                              r"Fix: name a file, or pass a dataset directory as --dataset_name DIR"):
        load_file(tmp_path / "data.json")
    with pytest.raises(DataFormatError, match=r"--validation_file .*nope\.json: no such file"):
        load_file(tmp_path / "nope.json", flag="--validation_file")


def test_huge_lines(tmp_path):
    big = "word " * 1_000_000  # a 5 MB line
    write_jsonl(tmp_path / "huge.jsonl", [GOOD, {**GOOD, "input": big}])
    assert len(examples_of(tmp_path / "huge.jsonl")) == 2
    (tmp_path / "huge_bad.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"instruction": "' + big + "\n",
                                             encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"huge_bad\.jsonl: line 2, column \d+: not valid JSON") as caught:
        load_file(tmp_path / "huge_bad.jsonl")
    write_jsonl(tmp_path / "huge_list.jsonl", [GOOD, GOOD, {**GOOD, "output": [big]}])
    with pytest.raises(DataFormatError, match=r"field 'output' is a list \(\[\"word word") as listed:
        load_file(tmp_path / "huge_list.jsonl")
    assert len(str(caught.value)) < 400 and len(str(listed.value)) < 400  # no 5 MB messages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{\n  "data": [{"instruction": "a", "output": "b"}]\n}\n',
         r"the file holds one JSON object \(are the records under 'data'\? save that list on its own\); expected a "
         r"JSON array of records"),
        ('{"instruction": "a", "output": "b"}\n[1, 2]\n', r"line 2: is a list \(\[1, 2\]\); expected a JSON object"),
        ('[{"instruction": "a", "output": "b"}, "c"]', r"record 1 is a string \(\"c\"\); expected an object"),
        ('[{"instruction": "a", "output": "b"}]\n[]\n', r"line 1: text after the closing '\]'"),
        ('[{"instruction": "a", "output": "b"} {"instruction": "c"}]',
         r"record 1: Expecting ',' delimiter at line 1, column 38: not valid JSON; expected a JSON array of objects"),
    ],
)
def test_json_layout_problems(tmp_path, text, expected):
    path = tmp_path / "layout.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=expected):
        load_file(path)


def test_data_errors_stop_the_cli_before_weights_load(tmp_path, tiny_llama_dir, shared_data, capsys):
    """The model directory's weights are garbage: a data error must come first, as one message."""
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_llama_dir.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    (model / "model.safetensors").write_bytes(b"not weights")
    code = main_clm(["--model_name_or_path", str(model), "--train_file", str(bad(shared_data, "missing_output.json")),
                     "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert re.search(r"lmtune: error: .*missing_output\.json: record 3: field 'output' is missing", err)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started
