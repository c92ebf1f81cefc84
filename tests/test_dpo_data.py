"""Preference pairs: recognized by their fields, checked with file/record/field, tokenized like SFT data."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from lmtune.data.preference import (
    Limits,
    fit_sequence,
    prepare_preference_data,
    read_pairs,
    render_preference_records,
)
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.sources import load_file
from lmtune.errors import DataFormatError


def render(tokenizer, path, **kwargs):
    records = load_file(path, skip_invalid=kwargs.get("skip_invalid", False))
    return render_preference_records(
        records, records.column_names, tokenizer, source=str(path),
        max_prompt_length=kwargs.pop("max_prompt_length", 64), max_length=kwargs.pop("max_length", 128), **kwargs,
    )


def answer(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_reference_format_prompt_is_system_plus_question_and_answers_end_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"system": "Be brief. ", "question": "What is a cat?", "chosen": "A small animal.", "rejected": "A car."},
    ])
    samples, stats = render(tokenizer, path)
    ids, labels = samples["chosen_input_ids"][0], samples["chosen_labels"][0]
    prompt_end = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    # The reference's prompt: system + question glued, no template; BOS from the tokenizer.
    assert ids[: prompt_end] == tokenizer("Be brief. What is a cat?").input_ids
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert answer(tokenizer, ids, labels).replace(" ", "") == "Asmallanimal.</s>".replace(" ", "")
    assert answer(tokenizer, samples["rejected_input_ids"][0], samples["rejected_labels"][0]).startswith("A car")
    assert stats.format == "system/question/chosen/rejected" and stats.pairs == 1


def test_duplicated_prompts_keep_every_pair_together_and_in_order(tmp_path, tokenizer):
    """The reference's set comprehensions de-duplicated and reordered each batch, splitting pairs."""
    records = []
    for i in range(6):
        records.append({"question": "Same question?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"})
        records.append(records[-1])  # an exact duplicate too
    samples, stats = render(tokenizer, write_jsonl(tmp_path / "dups.jsonl", records))
    assert stats.pairs == 12
    for row, record in enumerate(records):
        chosen = answer(tokenizer, samples["chosen_input_ids"][row], samples["chosen_labels"][row])
        rejected = answer(tokenizer, samples["rejected_input_ids"][row], samples["rejected_labels"][row])
        assert chosen.replace(" ", "").startswith(record["chosen"].replace(" ", ""))
        assert rejected.replace(" ", "").startswith(record["rejected"].replace(" ", ""))


def test_prompt_text_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}])
    samples, stats = render(tokenizer, path)
    assert stats.format == "prompt/chosen/rejected"
    assert samples["chosen_input_ids"][0][:2] == tokenizer("Say hi.").input_ids[:2]


@pytest.mark.parametrize("layout", ["conversations", "prompt-messages"])
def test_message_lists_render_in_the_chat_format(tmp_path, tokenizer, layout):
    user = {"role": "user", "content": "Name a color."}
    good, bad = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Seven."}
    record = ({"chosen": [user, good], "rejected": [user, bad]} if layout == "conversations"
              else {"prompt": [user], "chosen": [good], "rejected": [bad]})
    samples, stats = render(tokenizer, write_jsonl(tmp_path / "m.jsonl", [record]), max_prompt_length=200,
                            max_length=300)
    assert stats.format == "messages"
    prompt = tokenizer.decode([t for t, label in zip(samples["chosen_input_ids"][0], samples["chosen_labels"][0])
                               if label == IGNORE_INDEX])
    assert "### User:" in prompt and "Name a color." in prompt and prompt.rstrip().endswith("### Assistant:")
    supervised = answer(tokenizer, samples["chosen_input_ids"][0], samples["chosen_labels"][0])
    assert supervised.replace(" ", "") == "Blue.</s>"


def test_truncation_keeps_bos_and_prompt_end_and_cuts_answer_keeping_its_end():
    limits = Limits(max_prompt_length=4, max_length=7, bos=1)
    ids, labels, prompt_cut, answer_cut = fit_sequence([1, 10, 11, 12, 13, 14], [20, 21, 22, 23, 2], 1, limits)
    assert ids == [1, 12, 13, 14, 20, 21, 2] and prompt_cut and answer_cut
    assert labels == [IGNORE_INDEX] * 4 + [20, 21, 2]


def test_truncation_is_counted(tmp_path, tokenizer):
    long_question = " ".join(["word"] * 80)
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"question": long_question, "chosen": "yes " * 80, "rejected": "no"},
        {"question": "short?", "chosen": "yes", "rejected": "no"},
    ])
    samples, stats = render(tokenizer, path, max_prompt_length=16, max_length=40)
    assert stats.prompts_truncated == 1 and stats.chosen_truncated == 1 and stats.rejected_truncated == 0
    assert all(len(ids) <= 40 for ids in samples["chosen_input_ids"])
    assert samples["chosen_input_ids"][0][-1] == tokenizer.eos_token_id
    prompt = [t for t, label in zip(samples["rejected_input_ids"][0], samples["rejected_labels"][0])
              if label == IGNORE_INDEX]
    assert len(prompt) == 16 and prompt[0] == tokenizer.bos_token_id


BAD_RECORDS = [
    ({"question": "q?", "rejected": "b"}, "not preference pairs"),
    ({"question": "q?", "chosen": None, "rejected": "b"}, "record 1 (line 2): field 'chosen' is missing"),
    ({"question": "q?", "chosen": 5, "rejected": "b"}, "record 1 (line 2): field 'chosen' is a number"),
    ({"question": "q?", "chosen": "a", "rejected": "  "}, "record 1 (line 2): field 'rejected' is empty"),
    ({"question": "q?", "chosen": "", "rejected": "b"}, "record 1 (line 2): field 'chosen' is empty"),
    ({"question": "q?", "chosen": "same", "rejected": "same "}, "record 1 (line 2): fields 'chosen' and 'rejected' hold the same answer"),
    ({"question": "", "chosen": "a", "rejected": "b"}, "record 1 (line 2): field 'question' is empty"),
    ({"question": "q?", "system": ["x"], "chosen": "a", "rejected": "b"}, "field 'system' is a list"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_bad_records_name_file_record_and_field(tmp_path, tokenizer, bad, message):
    good = {"question": "fine?", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad] if "chosen" in bad else [bad])
    with pytest.raises(DataFormatError, match="bad.jsonl") as err:
        render(tokenizer, path)
    assert message in str(err.value)


MESSAGE_PROBLEMS = [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}]},
     "record 0 (line 1): fields 'chosen' and 'rejected' differ at message 0"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]},
     "record 0 (line 1): field 'chosen': message 0: the conversation must end with an assistant answer"),
    ({"chosen": [{"role": "user"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
     "record 0 (line 1): field 'chosen', message 0 is an object"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": "c"}, "record 0 (line 1): field 'rejected' is a string"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "fields 'chosen' and 'rejected' hold the same answer"),
]


@pytest.mark.parametrize("bad, message", MESSAGE_PROBLEMS)
def test_bad_message_pairs_name_file_record_and_field(tmp_path, tokenizer, bad, message):
    path = write_jsonl(tmp_path / "msgs.jsonl", [bad])
    with pytest.raises(DataFormatError, match="msgs.jsonl") as err:
        render(tokenizer, path)
    assert message in str(err.value)


def test_skip_invalid_records_reports_and_keeps_the_rest(tmp_path, tokenizer, caplog):
    records = [{"question": f"q{i}?", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(20)]
    records[7]["rejected"] = records[7]["chosen"]
    path = write_jsonl(tmp_path / "some_bad.jsonl", records)
    samples, stats = render(tokenizer, path, skip_invalid=True)
    assert stats.pairs == 19 and stats.skipped == 1
    assert "record 7 (line 8): fields 'chosen' and 'rejected' hold the same answer" in caplog.text


def test_too_many_invalid_records_refuse_even_when_skipping(tmp_path, tokenizer):
    records = [{"question": "q?", "chosen": "a", "rejected": "a"}] * 5 + [{"question": "q?", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataFormatError, match="5 of 6 records are invalid"):
        render(tokenizer, write_jsonl(tmp_path / "mostly_bad.jsonl", records), skip_invalid=True)


def test_prepare_holds_out_whole_pairs(tmp_path, tokenizer):
    records = [{"question": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(50)]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    data = prepare_preference_data(tokenizer, max_prompt_length=32, max_length=64, need_validation=True,
                                   train_file=str(path), validation_split_percentage=10)
    assert len(data.train) == 45 and len(data.validation) == 5
    row = data.validation[0]
    chosen = answer(tokenizer, row["chosen_input_ids"], row["chosen_labels"]).replace(" ", "")
    rejected = answer(tokenizer, row["rejected_input_ids"], row["rejected_labels"]).replace(" ", "")
    assert chosen.removeprefix("yes").removesuffix("</s>") == rejected.removeprefix("no").removesuffix("</s>")


def test_read_pairs_needs_records(tmp_path):
    with pytest.raises(DataFormatError, match="holds no records"):
        read_pairs([], ["chosen", "rejected"], "empty.jsonl")
