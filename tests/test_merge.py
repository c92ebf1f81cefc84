"""``lmtune merge``: the merged model is a plain transformers model computing base + adapter.

Adapters are made non-trivial without training (``init_lora_weights=False``, random IA3
scales), so equality with peft's own base+adapter logits is a real check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lmtune.cli import main
from lmtune.errors import ConfigError
from lmtune.export.merge import merge_adapter
from test_families import FAMILIES, T5, Family, build_family

PROBE = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])


def _save_adapter(base_dir: Path, out: Path, peft_config, seq2seq: bool = False, run_args: bool = True) -> Path:
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    torch.manual_seed(1)
    model = get_peft_model(auto.from_pretrained(base_dir), peft_config)
    if isinstance(peft_config, IA3Config):
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.data.uniform_(0.5, 1.5)  # IA3 starts at 1.0 (a no-op): move it
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    if run_args:  # what lmtune finetune records beside the adapter
        (out / "lmtune_args.json").write_text(json.dumps(
            {"args": {"model": {"model_name_or_path": str(base_dir)}, "finetune": {"task": "completion"}}}))
    return out


def _peft_logits(base_dir: Path, adapter: Path, seq2seq: bool = False) -> torch.Tensor:
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        kwargs = {"decoder_input_ids": PROBE[:, :3]} if seq2seq else {}
        return model(input_ids=PROBE, **kwargs).logits


@pytest.fixture
def llama_dir(tmp_path, tokenizer) -> Path:
    return build_family(Family("llama-demo", "llama", FAMILIES["llama"].config), tmp_path / "base", tokenizer)[0]


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merged_model_equals_base_plus_adapter(kind, llama_dir, tmp_path, caplog):
    configs = {
        "lora": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    adapter = _save_adapter(llama_dir, tmp_path / "adapter", configs[kind])
    with caplog.at_level(logging.INFO, logger="lmtune"):
        out = merge_adapter(adapter, tmp_path / "merged")  # base read back from lmtune_args.json
    phases = [r.getMessage().split(" ")[1] for r in caplog.records if r.getMessage().startswith("merge: ")]
    assert phases == ["loading", "folding", "saving"]

    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        got, plain = merged(input_ids=PROBE).logits, base(input_ids=PROBE).logits
    expected = _peft_logits(llama_dir, adapter)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter does change the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    record = json.loads((out / "lmtune_args.json").read_text())
    assert record["merged"]["base"] == str(llama_dir) and record["args"]["finetune"]["task"] == "completion"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith(f"---\nbase_model: {llama_dir}\nlibrary_name: transformers\n")
    assert f"with the {record['merged']['peft_type']} adapter `{adapter}` merged into its weights" in card
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card and "PeftModel" not in card
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == AutoTokenizer.from_pretrained(llama_dir)(
        "hello").input_ids


def test_merge_cli_refuses_a_non_empty_directory_unless_asked(llama_dir, tmp_path, capsys):
    adapter = _save_adapter(llama_dir, tmp_path / "adapter", LoraConfig(r=2, init_lora_weights=False,
                                                                          target_modules=["q_proj"]), run_args=False)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["merge", "--model_name_or_path", str(llama_dir), "--adapter", str(adapter), "--output_dir", str(out)]
    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert main(argv + ["--overwrite_output_dir", "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=PROBE).logits, _peft_logits(llama_dir, adapter),
                                   rtol=1e-4, atol=1e-5)


def test_merge_reads_base_from_peft_config_and_handles_t5(tmp_path, tokenizer):
    base_dir, _ = build_family(T5, tmp_path / "t5", tokenizer)
    adapter = _save_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=4, target_modules=["q", "v"],
                            init_lora_weights=False, task_type="SEQ_2_SEQ_LM"), seq2seq=True, run_args=False)
    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(input_ids=PROBE, decoder_input_ids=PROBE[:, :3]).logits
    torch.testing.assert_close(got, _peft_logits(base_dir, adapter, seq2seq=True), rtol=1e-4, atol=1e-5)


def test_merge_errors_say_what_and_how(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="no adapter_config.json there.*holds a whole model"):
        merge_adapter(llama_dir, tmp_path / "x")
    prompt = _save_adapter(llama_dir, tmp_path / "prompt", PromptTuningConfig(num_virtual_tokens=4,
                                                                               task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="PROMPT_TUNING adapter.*cannot be folded.*lmtune chat"):
        merge_adapter(prompt, tmp_path / "y")
    lora = _save_adapter(llama_dir, tmp_path / "lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="is the adapter or base directory"):
        merge_adapter(lora, lora, overwrite=True)
    assert main(["merge", "--adapter", str(lora)]) == 2
