"""--max_seq_length beyond the model's context is clamped with a notice, alike in training, eval and chat;
chat keeps room for the user's message."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GPT2Config, LlamaForCausalLM, T5Config

from lmtune.chat.args import parse_chat_args
from lmtune.chat.session import build_session, generation_budget, load_chat_model
from lmtune.cli import main
from lmtune.finetuning import finetune
from lmtune.model.context import context_length, fit_to_context

from conftest import tiny_llama_config, write_jsonl

CONTEXT = 256  # room for Alpaca prompts, not for the neural-chat default system prompt (190 tokens) too


@pytest.fixture(scope="module")
def short_llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("short-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), max_position_embeddings=CONTEXT)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "context of" in r.getMessage()]


def test_context_length_by_family():
    assert context_length(tiny_llama_config(32, max_position_embeddings=128)) == 128
    assert context_length(GPT2Config(n_positions=256)) == 256
    assert context_length(T5Config()) is None  # relative positions: no fixed context


def test_fit_to_context(caplog):
    config = tiny_llama_config(32, max_position_embeddings=128)
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert fit_to_context(100, config, "--max_seq_length") == 100
        assert notices(caplog) == []
        assert fit_to_context(512, config, "--max_seq_length") == 128
    assert notices(caplog) == ["--max_seq_length 512 is more than the model's context of 128 positions "
                               "(max_position_embeddings); using 128."]


def test_training_rows_fit_the_context(short_llama_dir, demo_records, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", demo_records[:20])
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        metrics = finetune(model_name_or_path=str(short_llama_dir), train_file=str(data), output_dir=str(tmp_path / "o"),
                           dry_run=True, dataset_concatenation=True, max_seq_length=512, report_to="none")
    assert notices(caplog) and "--max_seq_length 512" in notices(caplog)[0]
    assert metrics["dry_run_train_max_tokens"] <= CONTEXT


def test_eval_clamps_the_same_way(short_llama_dir, demo_records, tmp_path, caplog):
    data = write_jsonl(tmp_path / "val.jsonl", demo_records[:6])
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        code = main(["eval", "--model_name_or_path", str(short_llama_dir), "--task", "perplexity", "--validation_file",
                     str(data), "--max_seq_length", "512", "--output_dir", str(tmp_path / "eval")])
    assert code == 0 and any("--max_seq_length 512" in n for n in notices(caplog))
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["eval_tokens"] > 0


def test_generation_budget_keeps_half_the_context_for_the_prompt():
    config = tiny_llama_config(32, max_position_embeddings=64)
    assert generation_budget(config, 256, None) == (32, 32)
    assert generation_budget(config, 8, None) == (8, 56)
    assert generation_budget(config, 256, 60) == (4, 60)
    assert generation_budget(T5Config(), 256, None) == (256, None)


def test_chat_answers_a_short_message_on_a_small_context(short_llama_dir, caplog):
    """The neural-chat default system prompt alone outgrows the 128-token budget: it gives way to the message."""
    args = parse_chat_args(["--model_name_or_path", str(short_llama_dir), "--prompt", "Hi"])
    session = build_session(args, *load_chat_model(args))
    assert session.max_prompt_tokens == CONTEXT // 2
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        ids = session.prompt_ids("Hi")
    assert len(ids) <= CONTEXT // 2 and session.system == ""
    assert any("default system prompt leaves no room" in r.getMessage() for r in caplog.records)
    assert isinstance(session.reply("Hi"), str)
