"""Prompt templates, record formats and label masks, exactly."""

from __future__ import annotations

import pytest

from lmtune.data.formats import alpaca_prompt, detect_format, to_examples
from lmtune.data.render import IGNORE_INDEX, render_examples
from lmtune.errors import DataFormatError

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a color.\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
    "### Input:\n2 and 3\n\n### Response:\n"
)


def test_alpaca_templates_match_the_reference_exactly():
    assert alpaca_prompt("Name a color.") == ALPACA_NO_INPUT
    assert alpaca_prompt("Name a color.", "") == ALPACA_NO_INPUT
    assert alpaca_prompt("Add the numbers.", "2 and 3") == ALPACA_WITH_INPUT


def test_formats_are_recognized_from_fields_not_names():
    records = [{"question": "Why?", "response": "Because."}]
    examples = to_examples(records, ["question", "response"], "my_data.json")
    assert examples == [{"prompt": "Question: Why?\n\nAnswer: ", "response": "Because."}]
    assert detect_format(["instruction", "input", "output"], "x").name == "alpaca"
    assert detect_format(["instruction", "output"], "evol").name == "alpaca"
    assert detect_format(["text"], "x").name == "text"


def test_unknown_schema_names_fields_and_accepted_formats():
    with pytest.raises(DataFormatError, match=r"data.json: .*fields \['foo'\].*alpaca \(instruction, output"):
        to_examples([{"foo": "x"}], ["foo"], "data.json")


def test_bad_record_is_named_by_index_and_field():
    records = [{"instruction": "a", "output": "b"}, {"instruction": ["a"], "output": "b"}]
    with pytest.raises(DataFormatError, match=r"f.json: record 1: field 'instruction' is a list.*expected a string"):
        to_examples(records, ["instruction", "output"], "f.json")


def _render(tokenizer, examples, **kw):
    kw.setdefault("max_seq_length", 512)
    return render_examples(tokenizer, examples, **kw)


def test_labels_mask_exactly_the_prompt(tokenizer):
    prompt, response = alpaca_prompt("Name a color."), "Blue is a color."
    samples, stats = _render(tokenizer, [{"prompt": prompt, "response": response}])
    ids, labels = samples["input_ids"][0], samples["labels"][0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert ids == tokenizer(prompt + response).input_ids + [tokenizer.eos_token_id]
    supervised = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == response + tokenizer.eos_token
    first = labels.index(next(l for l in labels if l != IGNORE_INDEX))
    assert tokenizer.decode(ids[:first]) == tokenizer.bos_token + prompt
    assert stats.supervised_tokens == len(supervised) and stats.kept == 1


def test_train_on_inputs_supervises_all_but_the_first_token(tokenizer):
    samples, _ = _render(tokenizer, [{"prompt": "Question: a\n\nAnswer: ", "response": "b"}], train_on_inputs=True)
    labels = samples["labels"][0]
    assert labels[0] == IGNORE_INDEX
    assert labels[1:] == samples["input_ids"][0][1:]


def test_truncated_sample_keeps_a_supervised_eos(tokenizer):
    prompt = alpaca_prompt("Say a lot.")
    prompt_len = len(tokenizer(prompt).input_ids)
    samples, stats = _render(tokenizer, [{"prompt": prompt, "response": "word " * 200}],
                             max_seq_length=prompt_len + 10)
    ids, labels = samples["input_ids"][0], samples["labels"][0]
    assert len(ids) == prompt_len + 10
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    assert sum(l != IGNORE_INDEX for l in labels) == 10
    assert stats.truncated == 1


def test_prompt_that_fills_the_budget_is_dropped_and_counted(tokenizer, caplog):
    long = {"prompt": alpaca_prompt("x " * 300), "response": "ok"}
    short = {"prompt": alpaca_prompt("Name a color."), "response": "Red."}
    samples, stats = _render(tokenizer, [long, short], max_seq_length=128)
    assert len(samples["input_ids"]) == 1 and stats.dropped_long_prompt == 1 and stats.dropped_indices == [0]
    assert "1 sample(s) dropped: the prompt alone fills --max_seq_length 128 (first: record 0)" in caplog.text
    with pytest.raises(DataFormatError, match="every sample's prompt is longer than --max_seq_length 128"):
        _render(tokenizer, [long], max_seq_length=128)


def test_no_sample_is_all_masked(tokenizer, demo_records):
    examples = to_examples(demo_records, ["instruction", "input", "output"], "demo")
    samples, _ = _render(tokenizer, examples, max_seq_length=96)
    for labels in samples["labels"]:
        assert any(l != IGNORE_INDEX for l in labels)


def test_boundary_has_no_retokenization_drift(tokenizer):
    # The prompt ends mid-word: tokenizing it alone would split "colo|r" differently than the whole text.
    samples, _ = _render(tokenizer, [{"prompt": "Name a colo", "response": "r please"}])
    ids, labels = samples["input_ids"][0], samples["labels"][0]
    assert ids == tokenizer("Name a color please").input_ids + [tokenizer.eos_token_id]
    supervised = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert supervised.endswith(" please" + tokenizer.eos_token)


def test_tokenizer_without_eos_is_rejected(tokenizer):
    broken = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataFormatError, match="the tokenizer has no EOS token"):
        _render(broken, [{"prompt": "a", "response": "b"}])


def test_tokenize_segments_renders_a_preference_pair(tokenizer):
    """What DPO needs: prompt + chosen and prompt + rejected, masked alike, EOS kept when cut."""
    from lmtune.data.render import ANSWER, END, PROMPT, tokenize_segments

    prompt, eos = "Name a color.\n", [tokenizer.eos_token_id]
    chosen = tokenize_segments(tokenizer, [(prompt, PROMPT), ("Blue", ANSWER), (eos, END)], 64)
    rejected = tokenize_segments(tokenizer, [(prompt, PROMPT), ("word " * 80, ANSWER), (eos, END)], 64)
    masked = len(tokenizer(prompt).input_ids)
    for sample in (chosen, rejected):
        assert sample["labels"][:masked] == [IGNORE_INDEX] * masked and not sample["dropped"]
        assert sample["input_ids"][:masked] == chosen["input_ids"][:masked]
        assert sample["labels"][-1] == sample["input_ids"][-1] == tokenizer.eos_token_id
    assert chosen["supervised_tokens"] == len(chosen["input_ids"]) - masked and chosen["truncated_tokens"] == 0
    assert len(rejected["input_ids"]) == 64 and rejected["truncated_tokens"] > 0
    too_long = tokenize_segments(tokenizer, [(prompt, PROMPT), ("x", ANSWER), (eos, END)], 64, max_prompt_length=2)
    assert too_long["dropped"] and too_long["input_ids"] == []


def test_tokenize_segments_seq2seq_splits_source_and_labels(tokenizer):
    from lmtune.data.render import ANSWER, END, PROMPT, tokenize_segments

    eos = tokenizer.eos_token_id
    sample = tokenize_segments(tokenizer, [("Translate: hi", PROMPT), ([5, 6, 7, 8], ANSWER), ([eos], END)], 3,
                               seq2seq=True)
    assert sample["input_ids"] == tokenizer("Translate: hi").input_ids
    assert sample["labels"] == [5, 6, eos] and sample["truncated_tokens"] == 2
    assert sample["tokens"] == len(sample["input_ids"]) + 3 and sample["supervised_tokens"] == 3
