"""Summarization data: exact prompt/target layout, truncation, evaluation prompts, real CNN/DailyMail stand-ins."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from lmtune.data.chat_format import PieceEncoder
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.summarization import (
    SUMMARIZE_INSTRUCTION,
    render_summarization_records,
    summarization_prompts,
    summarization_references,
    summary_prompt_ids,
)
from lmtune.errors import ConfigError, DataFormatError

ARTICLE = "The council approved a new park on Monday. Work starts in May and ends next year."
HIGHLIGHTS = "Council approves new park.\nWork starts in May."
COLUMNS = ["article", "highlights", "id"]


def render(tokenizer, records, **kwargs):
    return render_summarization_records(records, COLUMNS, tokenizer, source="s.jsonl", **kwargs)


def test_prompt_and_target_token_for_token(tokenizer):
    samples, stats = render(tokenizer, [{"article": ARTICLE, "highlights": HIGHLIGHTS, "id": "a"}])
    ids, labels = samples["input_ids"][0], samples["labels"][0]
    assert SUMMARIZE_INSTRUCTION == "\nSummarize the highlights of this article.\n"
    assert ids == tokenizer(ARTICLE + SUMMARIZE_INSTRUCTION + HIGHLIGHTS).input_ids + [tokenizer.eos_token_id]
    prompt_length = len(tokenizer(ARTICLE + SUMMARIZE_INSTRUCTION).input_ids)
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert labels[prompt_length:] == ids[prompt_length:]
    assert tokenizer.decode(labels[prompt_length:]) == HIGHLIGHTS + "</s>"
    assert (stats.kept, stats.truncated, stats.supervised_tokens) == (1, 0, len(ids) - prompt_length)


def test_article_cut_to_max_source_length_and_target_to_max_seq_length(tokenizer):
    record = {"article": ARTICLE * 10, "highlights": HIGHLIGHTS * 10, "id": "a"}
    instruction = tokenizer(SUMMARIZE_INSTRUCTION, add_special_tokens=False).input_ids
    samples, stats = render(tokenizer, [record], max_source_length=40, max_seq_length=60)
    ids, labels = samples["input_ids"][0], samples["labels"][0]
    assert len(ids) == 60 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert ids[40 - len(instruction): 40] == instruction  # the article is cut at its end, the instruction kept
    article = tokenizer(ARTICLE * 10, add_special_tokens=False).input_ids
    assert ids[1: 40 - len(instruction)] == article[: 39 - len(instruction)]
    assert labels[:40] == [IGNORE_INDEX] * 40 and labels[40:] == ids[40:]
    assert tokenizer.decode(ids[40:-1]) == HIGHLIGHTS[: len(tokenizer.decode(ids[40:-1]))]
    assert stats.truncated == 1
    samples, _ = render(tokenizer, [record], max_source_length=40, max_seq_length=60, train_on_inputs=True)
    assert samples["labels"][0] == [IGNORE_INDEX] + samples["input_ids"][0][1:]


def test_limits_and_bad_records(tokenizer):
    with pytest.raises(ConfigError, match=r"--max_source_length 5 leaves no room for the article: the instruction"):
        render(tokenizer, [{"article": ARTICLE, "highlights": HIGHLIGHTS, "id": "a"}], max_source_length=5)
    with pytest.raises(DataFormatError, match=r"s\.jsonl: every prompt fills --max_seq_length 40"):
        render(tokenizer, [{"article": ARTICLE * 5, "highlights": HIGHLIGHTS, "id": "a"}], max_source_length=60,
               max_seq_length=40)
    records = [{"article": ARTICLE, "highlights": HIGHLIGHTS, "id": "a"},
               {"article": ARTICLE, "highlights": None, "id": "b"}]
    with pytest.raises(DataFormatError, match=r"s\.jsonl: record 1: field 'highlights' is missing"):
        render(tokenizer, records)
    with pytest.raises(DataFormatError, match=r"s\.jsonl: .*fields \['text'\], which match no known format"):
        render_summarization_records([{"text": "x"}], ["text"], tokenizer, source="s.jsonl")


def test_evaluation_prompts_reproduce_the_training_prompts(tokenizer):
    records = [{"article": ARTICLE, "highlights": HIGHLIGHTS, "id": "a"},
               {"article": ARTICLE * 10, "highlights": "Short.", "id": "b"}]
    budget = len(tokenizer(ARTICLE + SUMMARIZE_INSTRUCTION).input_ids)  # the first article just fits
    prompts = summarization_prompts(records, tokenizer, max_source_length=budget)
    assert prompts[0] == ARTICLE + SUMMARIZE_INSTRUCTION
    assert prompts[1].endswith(SUMMARIZE_INSTRUCTION)
    assert (ARTICLE * 10).startswith(prompts[1][: -len(SUMMARIZE_INSTRUCTION)])
    encoder = PieceEncoder(tokenizer)
    for record, prompt in zip(records, prompts):
        assert tokenizer(prompt).input_ids == summary_prompt_ids(encoder, record["article"], budget)[0]
    assert len(tokenizer(prompts[1]).input_ids) == budget
    assert summarization_references(records) == [HIGHLIGHTS, "Short."]


def test_cnn_dailymail_stand_in_and_small_file(tokenizer, shared_data):
    prepared = prepare_data(
        tokenizer, task="summarization", dataset_name=str(shared_data / "hub/cnn_dailymail"),
        dataset_config_name="3.0.0", max_train_samples=12, max_eval_samples=4, need_validation=True,
        settings=RenderSettings(max_seq_length=512, max_source_length=384),
    )
    assert len(prepared.train) == 12 and len(prepared.validation) == 4
    for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"]):
        assert len(ids) <= 512 and ids[-1] == tokenizer.eos_token_id
        prompt = sum(label == IGNORE_INDEX for label in labels)
        assert prompt <= 384 and tokenizer.decode(ids[:prompt]).endswith(SUMMARIZE_INSTRUCTION)
    references = summarization_references(prepared.raw_validation)
    assert references == prepared.raw_validation["highlights"]
    assert len(summarization_prompts(prepared.raw_validation, tokenizer, 384)) == 4
    small = shared_data / "files/summarization_small.jsonl"
    prepared = prepare_data(tokenizer, task="summarization", train_file=str(small), max_train_samples=5)
    first = json.loads(small.read_text(encoding="utf-8").splitlines()[0])
    assert tokenizer.decode(prepared.train[0]["input_ids"]).startswith("<s>" + first["article"][:50])


@pytest.mark.slow
def test_finetune_summarization_end_to_end(tiny_llama_dir, tmp_path):
    from lmtune.finetuning import finetune

    records = [{"article": f"{ARTICLE} Item {i}.", "highlights": f"Park {i}.", "id": str(i)} for i in range(8)]
    data = write_jsonl(tmp_path / "sum.jsonl", records)
    out = tmp_path / "out"
    metrics = finetune(
        model_name_or_path=str(tiny_llama_dir), train_file=str(data), task="summarization", output_dir=str(out),
        do_train=True, max_steps=5, per_device_train_batch_size=4, max_seq_length=96, max_source_length=64,
        learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    assert metrics["train_samples"] == 8 and metrics["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    saved = json.loads((out / "lmtune_args.json").read_text(encoding="utf-8"))
    assert saved["args"]["finetune"]["task"] == "summarization"
