"""The two stock Trainer choices lmtune changes: DDP's unused-parameter search, and the token in training_args.bin."""

from __future__ import annotations

import io
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, TrainingArguments

import lmtune.finetuning
from conftest import tiny_llama_config
from lmtune.cli import main_clm
from lmtune.model.adapters import AdapterSettings, apply_adapter
from lmtune.train.trainer import (
    adapter_find_unused_parameters,
    build_trainer,
    secret_fields,
    secrets_left_out_of_pickles,
)

ADAPTERS = {
    "lora": AdapterSettings(peft="lora"),
    "dora": AdapterSettings(peft="lora", use_dora=True),
    "ia3": AdapterSettings(peft="ia3"),
    "prefix": AdapterSettings(peft="prefix", num_virtual_tokens=4),
    "prompt": AdapterSettings(peft="prompt", num_virtual_tokens=4),
    "ptun": AdapterSettings(peft="ptun", num_virtual_tokens=4, ptun_hidden_size=32),
    "llama_adapter": AdapterSettings(peft="llama_adapter", adapter_len=4, adapter_layers=2),
}


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer)))


# --- DDP: find_unused_parameters ---------------------------------------------------------------


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_every_adapter_parameter_gets_a_gradient_so_ddp_need_not_search(method, tokenizer):
    # The premise of find_unused_parameters=False: one step's backward reaches every trainable tensor.
    model = apply_adapter(tiny_llama(tokenizer), ADAPTERS[method])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable
    assert [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None] == []
    assert adapter_find_unused_parameters(model) is False


class RoutedExperts(torch.nn.Module):
    """A mixture of experts in miniature: the router picks one expert per call, the other gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(4, 2)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[int(self.router(x).sum(-1).argmax())](x)


@pytest.mark.parametrize(("targets", "expected"), [(["router"], False), (["router", "experts.0", "experts.1"], None)])
def test_adapters_inside_experts_keep_the_stock_search(targets, expected):
    model = get_peft_model(RoutedExperts(), LoraConfig(r=2, target_modules=targets))
    assert adapter_find_unused_parameters(model) is expected


def test_a_full_model_keeps_transformers_choice(tokenizer):
    assert adapter_find_unused_parameters(tiny_llama(tokenizer)) is None


@pytest.mark.parametrize(("adapter", "requested", "expected"), [
    (True, None, False),  # lmtune's default for adapters
    (True, True, True),  # the user's flag is left alone, either way
    (True, False, False),
    (False, None, True),  # full fine-tuning: transformers' own choice (no activation checkpointing)
])  # fmt: skip
def test_the_trainer_hands_the_choice_to_ddp(adapter, requested, expected, tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    model = apply_adapter(model, ADAPTERS["lora"]) if adapter else model
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             ddp_find_unused_parameters=requested)
    trainer = build_trainer(model, tokenizer, args, train_dataset=None, eval_dataset=None, data_collator=None)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is expected
    assert args.ddp_find_unused_parameters is requested  # decided in the Trainer, the arguments untouched


# --- no token on disk ----------------------------------------------------------------------------

SECRET = "secret123"


def test_secret_fields_follow_transformers_masking():
    args = TrainingArguments(output_dir="o", hub_token=SECRET, report_to="none")
    assert secret_fields(args) == ["hub_token"]
    assert SECRET not in json.dumps(args.to_dict())  # transformers masks the same fields in its own dumps


def test_hub_token_never_reaches_the_output_dir(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    kept = {}

    def keep(*args, **kwargs):
        kept["trainer"] = build_trainer(*args, **kwargs)
        return kept["trainer"]

    monkeypatch.setattr(lmtune.finetuning, "build_trainer", keep)
    out = tmp_path / "out"
    assert main_clm([
        "--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file), "--output_dir", str(out),
        "--do_train", "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
        "--max_seq_length", "128", "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "True",
        "--no_cuda", "--hub_token", SECRET,
    ]) == 0  # fmt: skip
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"checkpoint-1", "checkpoint-2"} <= {path.parent.name for path in files}
    assert [path for path in files if SECRET.encode() in path.read_bytes()] == []
    for bin_file in [out / "training_args.bin", out / "checkpoint-2" / "training_args.bin"]:
        saved = torch.load(bin_file, weights_only=False)
        assert isinstance(saved, TrainingArguments)
        assert saved.hub_token is None
        assert (saved.output_dir, saved.max_steps, saved.save_steps, saved.learning_rate) == (str(out), 2, 1, 0.01)
    live = kept["trainer"].args
    assert live.hub_token == SECRET  # a push to the hub still has its token
    stock = io.BytesIO()
    torch.save(live, stock)  # outside a save the stock pickle is back, token and all: the scan above can fail
    assert SECRET.encode() in stock.getvalue()


def test_saved_args_load_without_lmtune():
    # The pickle names only transformers' class, as the stock one does.
    args = TrainingArguments(output_dir="out", hub_token=SECRET, report_to="none")
    buffer = io.BytesIO()
    with secrets_left_out_of_pickles(TrainingArguments):
        torch.save(args, buffer)
    assert b"lmtune" not in buffer.getvalue() and SECRET.encode() not in buffer.getvalue()
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is TrainingArguments and loaded.hub_token is None
    assert loaded.to_dict() == args.to_dict()  # every other field as it was (to_dict masks the token in both)
    assert args.hub_token == SECRET
