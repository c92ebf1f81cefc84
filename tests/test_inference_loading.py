"""One loader for using a model (lmtune.model.inference) and one module for the run record (lmtune.run_record)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lmtune.errors import ConfigError, UnsupportedError
from lmtune.model.inference import inference_dtype, load_for_use, resolve_device
from lmtune.run_record import ARGS_FILE, read_training_settings, recorded_base_model, write_run_args


def save_adapter(base_dir, out, seed: int):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_device_and_dtype_resolution():
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(ConfigError, match=r"--device must be one of auto, cpu, cuda, xpu, hpu \(got 'cpuu'\)"):
        resolve_device("cpuu")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedError, match="--device cuda needs an NVIDIA GPU"):
            resolve_device("cuda")
    assert inference_dtype("bfloat16") is torch.bfloat16
    config = type("Config", (), {"dtype": "float16"})()
    assert inference_dtype("auto", config) is torch.float16
    assert inference_dtype("auto") is torch.float32
    with pytest.raises(ConfigError, match="--dtype must be one of float32, bfloat16, float16, auto"):
        inference_dtype("fp8")


@pytest.mark.filterwarnings("error:Found missing adapter keys")
def test_named_adapters_share_one_base(tiny_llama_dir, tmp_path):
    first = save_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    second = save_adapter(tiny_llama_dir, tmp_path / "b", seed=2)
    model, tokenizer = load_for_use(str(tiny_llama_dir), {"a": first, "b": second}, device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    ids = torch.tensor([tokenizer("Hello there").input_ids])
    logits = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        logits[name] = model(input_ids=ids).logits
    with model.disable_adapter():
        logits["base"] = model(input_ids=ids).logits
    for name, path in (("a", first), ("b", second)):
        single, _ = load_for_use(str(tiny_llama_dir), path, device="cpu")
        torch.testing.assert_close(single(input_ids=ids).logits, logits[name])
    assert not torch.allclose(logits["a"], logits["b"]) and not torch.allclose(logits["a"], logits["base"])


def test_adapter_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="It holds a whole model: pass it as --model_name_or_path"):
        load_for_use(str(tiny_llama_dir), tiny_llama_dir)
    with pytest.raises(ConfigError, match=r"--adapter x=.*: no adapter_config.json there"):
        load_for_use(str(tiny_llama_dir), {"x": tmp_path}, adapter_flag="--adapter x=")


def test_adapters_on_one_base_must_share_their_vocabulary(tiny_llama_dir, tmp_path, tokenizer):
    first = save_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    second = save_adapter(tiny_llama_dir, tmp_path / "b", seed=2)
    tokenizer.save_pretrained(second)
    grown = copy.deepcopy(tokenizer)
    grown.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    grown.save_pretrained(first)
    with pytest.raises(ConfigError, match=r"adapter b \(.*\) was trained with a different vocabulary"):
        load_for_use(str(tiny_llama_dir), {"a": first, "b": second}, device="cpu")
    model, loaded = load_for_use(str(tiny_llama_dir), {"a": first}, device="cpu")
    assert "<|tool|>" in loaded.get_vocab() and model.get_input_embeddings().weight.shape[0] == len(grown)


def test_run_record_of_a_run_and_its_checkpoints(tmp_path):
    write_run_args(str(tmp_path), {"model": {"model_name_or_path": "base-dir"},
                                   "finetune": {"task": "chat", "chat_template": "chatml"}})
    assert (tmp_path / ARGS_FILE).is_file()
    checkpoint = tmp_path / "checkpoint-20"
    checkpoint.mkdir()
    for where in (tmp_path, checkpoint):
        assert read_training_settings(where) == {"chat_template": "chatml", "task": "chat"}
        assert recorded_base_model(where) == "base-dir"
    assert read_training_settings(tmp_path / "elsewhere") == {} and recorded_base_model(None) is None
