"""The seq2seq (FLAN-T5) path: exact encoder inputs and labels per task, collation, every PEFT method
peft runs on T5, and the reference's finetune_seq2seq command line end to end on a tiny T5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

from lmtune.cli import main_seq2seq
from lmtune.data.chat import render_prompt
from lmtune.data.chat_format import resolve_chat_format
from lmtune.data.prepare import prepare_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.seq2seq import (
    SEQ2SEQ_PROMPT_NO_INPUT,
    render_seq2seq_records,
    seq2seq_alpaca_prompt,
    summary_source_budget,
)
from lmtune.data.summarization import SUMMARIZE_INSTRUCTION, summarization_prompts
from lmtune.errors import ConfigError, DataFormatError
from lmtune.finetuning import finetune
from lmtune.model.load import load_tokenizer
from tiny_t5 import EOS_ID, PAD_ID, build_t5_tokenizer, save_tiny_t5

RECORDS = [
    {"instruction": "  Name a colour. ", "input": "", "output": " Blue is a colour. "},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
ARTICLE = "The council met on Monday and agreed to build a new bridge over the river. " * 6
HIGHLIGHTS = "Council agrees to build a bridge.\nWork starts next year."


@pytest.fixture(scope="module")
def t5_tokenizer():
    return build_t5_tokenizer()


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def test_alpaca_source_is_the_reference_prompt_without_trailing_newline(t5_tokenizer):
    samples, stats = render_seq2seq_records(RECORDS, ["instruction", "input", "output"], t5_tokenizer,
                                            task="completion", source="a.json", max_source_length=256,
                                            max_target_length=64)
    prompt = seq2seq_alpaca_prompt("  Name a colour. ", "")
    assert prompt == SEQ2SEQ_PROMPT_NO_INPUT.format(instruction="Name a colour.") and prompt.endswith("### Response:")
    assert samples["input_ids"][0] == t5_tokenizer(prompt).input_ids  # T5's </s> ends the encoder input
    assert samples["input_ids"][0][-1] == EOS_ID
    assert "### Input:\n2 and 3\n\n### Response:" in t5_tokenizer.decode(samples["input_ids"][1])
    # Labels: the stripped output and EOS, nothing masked and no pad inside.
    assert samples["labels"][0] == t5_tokenizer("Blue is a colour.", add_special_tokens=False).input_ids + [EOS_ID]
    assert samples["labels"][1] == t5_tokenizer("5", add_special_tokens=False).input_ids + [EOS_ID]
    assert stats.kept == 2 and stats.truncated == 0
    assert stats.supervised_tokens == len(samples["labels"][0]) + len(samples["labels"][1])


def test_target_cut_to_max_target_length_keeps_eos_and_long_sources_are_dropped(t5_tokenizer):
    records = [{"instruction": "Describe it.", "output": "word " * 40},
               {"instruction": "Describe it. " * 80, "output": "short"}]
    samples, stats = render_seq2seq_records(records, ["instruction", "output"], t5_tokenizer, task="completion",
                                            source="a.json", max_source_length=128, max_target_length=8)
    assert len(samples["labels"]) == 1 and len(samples["labels"][0]) == 8 and samples["labels"][0][-1] == EOS_ID
    assert samples["labels"][0][:7] == t5_tokenizer(("word " * 40).strip(), add_special_tokens=False).input_ids[:7]
    assert stats.truncated == 1 and stats.dropped_long_prompt == 1 and stats.dropped_indices == [1]
    with pytest.raises(DataFormatError, match=r"a\.json: every source is longer than --max_source_length 10"):
        render_seq2seq_records(records, ["instruction", "output"], t5_tokenizer, task="completion",
                               source="a.json", max_source_length=10, max_target_length=8)
    with pytest.raises(ConfigError, match="--max_target_length must be >= 2 for seq2seq"):
        render_seq2seq_records(records, ["instruction", "output"], t5_tokenizer, task="completion",
                               source="a.json", max_target_length=1)


def test_collated_batch_keeps_t5_pad_and_starts_the_decoder_with_decoder_start(tiny_t5_dir):
    tokenizer = load_tokenizer(str(tiny_t5_dir))
    assert tokenizer.pad_token_id == PAD_ID != tokenizer.eos_token_id  # T5's own pad, not EOS
    samples, _ = render_seq2seq_records(RECORDS, ["instruction", "input", "output"], tokenizer, task="completion",
                                        source="a.json")
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    batch = collate([{"input_ids": i, "labels": l} for i, l in zip(samples["input_ids"], samples["labels"])])
    short = len(samples["input_ids"][0])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"][0, short:].eq(PAD_ID).all() and batch["attention_mask"][0, short:].eq(0).all()
    assert batch["attention_mask"][0, :short].eq(1).all()
    n_labels = len(samples["labels"][1])
    assert batch["labels"][1, :n_labels].tolist() == samples["labels"][1]
    assert batch["labels"][1, n_labels:].eq(IGNORE_INDEX).all()
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert decoder_inputs[:, 0].eq(model.config.decoder_start_token_id).all()
    assert decoder_inputs[1, 1:n_labels].tolist() == samples["labels"][1][:-1]
    # The loss is the mean over real label tokens only.
    logits = model(**batch).logits
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert model(**batch).loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_chat_source_is_what_lmtune_chat_feeds_and_target_the_last_answer(t5_tokenizer):
    conversation = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    samples, stats = render_seq2seq_records([{"messages": conversation}], ["messages"], t5_tokenizer, task="chat",
                                            source="c.jsonl", max_source_length=512, max_target_length=16)
    expected = render_prompt(t5_tokenizer, conversation[:-1], resolve_chat_format(None, t5_tokenizer))
    assert samples["input_ids"] == [expected]
    assert t5_tokenizer.decode(expected).endswith("### User:\nName a colour.</s>\n### Assistant:\n")
    assert samples["labels"] == [t5_tokenizer("Blue.", add_special_tokens=False).input_ids + [EOS_ID]]
    # Too long: the oldest pair goes first, as in causal chat training.
    short_limit = len(expected) - 5
    samples, _ = render_seq2seq_records([{"messages": conversation}], ["messages"], t5_tokenizer, task="chat",
                                        source="c.jsonl", max_source_length=short_limit, max_target_length=16)
    assert "Hi there." not in t5_tokenizer.decode(samples["input_ids"][0])
    assert "Name a colour." in t5_tokenizer.decode(samples["input_ids"][0])


def test_summarization_source_fits_and_matches_the_rouge_prompt(t5_tokenizer):
    records = [{"article": ARTICLE, "highlights": HIGHLIGHTS, "id": "x"}]
    samples, stats = render_seq2seq_records(records, ["article", "highlights", "id"], t5_tokenizer,
                                            task="summarization", source="s.jsonl", max_source_length=48,
                                            max_target_length=64)
    ids = samples["input_ids"][0]
    assert len(ids) <= 48 and ids[-1] == EOS_ID
    prompt = summarization_prompts(records, t5_tokenizer, summary_source_budget(t5_tokenizer, 48))[0]
    assert prompt.endswith(SUMMARIZE_INSTRUCTION) and ids == t5_tokenizer(prompt).input_ids
    assert samples["labels"][0] == t5_tokenizer(HIGHLIGHTS, add_special_tokens=False).input_ids + [EOS_ID]


def test_packing_is_refused_for_seq2seq(t5_tokenizer, tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    with pytest.raises(ConfigError, match="--dataset_concatenation does not apply to seq2seq"):
        prepare_data(t5_tokenizer, train_file=str(data), dataset_concatenation=True, seq2seq=True)


def reference_flan_t5_flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    """The reference's FLAN-T5 command line, hub names swapped for local paths, cut to a few steps."""
    return [
        "--model_name_or_path", str(model_dir), "--bf16", "True", "--train_file", str(data),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--do_train", "--learning_rate", "1.0e-5", "--warmup_ratio", "0.03",
        "--weight_decay", "0.0", "--num_train_epochs", "5", "--logging_steps", "10", "--save_steps", "2000",
        "--save_total_limit", "2", "--overwrite_output_dir", "--output_dir", str(out), "--peft", "lora",
        # Local additions: a few steps on a few records, no reporting integrations.
        "--max_steps", "3", "--max_train_samples", "12", "--report_to", "none", "--disable_tqdm", "True",
    ]


def test_reference_flan_t5_command_line_trains_and_saves_a_lora_adapter(tiny_t5_dir, shared_data, tmp_path):
    out = tmp_path / "flan-t5_peft_finetuned_model"
    assert main_seq2seq(reference_flan_t5_flags(tiny_t5_dir, shared_data / "files" / "alpaca_small.json", out)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "train_results.json",
                 "all_results.json", "trainer_state.json", "lmtune_args.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 12 and results["train_loss"] > 0
    weights = load_file(out / "adapter_model.safetensors")
    assert any("encoder" in k for k in weights) and any("decoder" in k for k in weights)
    # The saved adapter loads with plain peft onto the base model and generates.
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    tuned = PeftModel.from_pretrained(base, out)
    generated = tuned.generate(input_ids=torch.tensor([[5, 6, 7, EOS_ID]]), max_new_tokens=3)
    assert generated[0, 0].item() == base.config.decoder_start_token_id


@pytest.mark.parametrize("method, peft_type", [("lora", "LORA"), ("ia3", "IA3"), ("prefix", "PREFIX_TUNING"),
                                               ("prompt", "PROMPT_TUNING"), ("ptun", "P_TUNING")])
def test_every_peft_method_peft_runs_on_t5_trains(method, peft_type, tiny_t5_dir, tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps(RECORDS * 4), encoding="utf-8")
    metrics = finetune(model_name_or_path=str(tiny_t5_dir), train_file=str(data), output_dir=str(tmp_path / "o"),
                       do_train=True, max_steps=1, peft=method, num_virtual_tokens=4, ptun_hidden_size=16,
                       per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True)
    assert metrics["train_loss"] > 0
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["peft_type"] == peft_type


def test_llama_adapter_on_t5_is_refused_before_training(tiny_t5_dir, tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    with pytest.raises(ConfigError, match="--peft llama_adapter: peft's LLaMA-Adapter supports model types"):
        finetune(model_name_or_path=str(tiny_t5_dir), train_file=str(data), output_dir=str(tmp_path / "o"),
                 do_train=True, max_steps=1, peft="llama_adapter", report_to="none")


def test_seq2seq_chat_and_summarization_train(tiny_t5_dir, shared_data, tmp_path):
    files = shared_data / "files"
    common = dict(model_name_or_path=str(tiny_t5_dir), do_train=True, max_steps=1, max_train_samples=4,
                  per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True,
                  max_source_length=512, max_target_length=32)
    chat = finetune(output_dir=str(tmp_path / "chat"), train_file=str(files / "chat_small.jsonl"), task="chat",
                    **common)
    assert chat["train_samples"] == 4 and chat["train_loss"] > 0
    summary = finetune(output_dir=str(tmp_path / "sum"), train_file=str(files / "summarization_small.jsonl"),
                       task="summarization", **common)
    assert summary["train_samples"] == 4 and summary["train_loss"] > 0


def test_seq2seq_summarization_rouge_from_generated_text(tiny_t5_dir, shared_data, tmp_path):
    data = shared_data / "files" / "summarization_small.jsonl"
    common = dict(model_name_or_path=str(tiny_t5_dir), train_file=str(data), validation_file=str(data),
                  task="summarization", do_train=True, do_eval=True, max_steps=1, max_train_samples=4,
                  max_eval_samples=3, max_source_length=96, max_target_length=12, num_beams=1,
                  report_to="none", save_strategy="no", disable_tqdm=True)
    # Without --predict_with_generate: ROUGE after evaluation, from summaries generated in batches.
    out = tmp_path / "post"
    metrics = finetune(output_dir=str(out), **common)
    rows = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 == metrics["eval_rouge_samples"]
    assert all(row["prediction"] and row["reference"] for row in rows)
    from lmtune.evaluate.rouge import compute_rouge

    expected = compute_rouge([r["prediction"] for r in rows], [r["reference"] for r in rows])
    saved = json.loads((out / "eval_results.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert saved[f"eval_{key}"] == pytest.approx(expected[key], abs=1e-4)
    assert "eval_rouge1" in json.loads((out / "all_results.json").read_text())
    # With it: the Seq2SeqTrainer generates at evaluation, and ROUGE comes from that text.
    out = tmp_path / "pwg"
    metrics = finetune(output_dir=str(out), predict_with_generate=True, **common)
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_loss"} <= set(metrics)
    assert not (out / "eval_generations.jsonl").exists()  # computed once, by the trainer
    assert all(0 <= metrics[f"eval_{k}"] <= 100 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
