"""QLoRA (``--qlora``): a 4- or 8-bit base model from bitsandbytes plus a trained LoRA adapter.

bitsandbytes >= 0.46 has a CPU backend, so these run here; on a machine without it the
training tests skip and the error test checks what the user is told instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lmtune.model.quantize as quantize
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.model.quantize import QuantSettings, check_quantization_backend, quantization_config

HAVE_BNB = quantize._bitsandbytes_version() is not None and quantize._bitsandbytes_version() >= quantize.BNB_CPU_MIN
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes >= 0.46 (CPU backend) is not installed")


@pytest.fixture
def trainer_spy(monkeypatch):
    import lmtune.finetuning

    built = []
    real = lmtune.finetuning.build_trainer
    monkeypatch.setattr(lmtune.finetuning, "build_trainer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    return built


def test_quantization_config_carries_every_flag_once():
    four = quantization_config(QuantSettings(bits=4, quant_type="fp4", double_quant=False,
                                             compute_dtype=torch.bfloat16))
    assert isinstance(four, BitsAndBytesConfig) and four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant, four.bnb_4bit_compute_dtype) == (
        "fp4", False, torch.bfloat16)
    eight = quantization_config(QuantSettings(bits=8))
    assert eight.load_in_8bit and not eight.load_in_4bit and eight.llm_int8_threshold == 6.0


def test_unrunnable_requests_say_what_would_work(monkeypatch, tiny_llama_dir, alpaca_file, tmp_path):
    from lmtune.finetuning import finetune

    monkeypatch.setattr(quantize, "_bitsandbytes_version", lambda: None)
    with pytest.raises(UnsupportedError, match=r"--qlora needs bitsandbytes.*pip install 'bitsandbytes>=0.46'"):
        check_quantization_backend(QuantSettings(), "cpu")
    from packaging.version import Version

    monkeypatch.setattr(quantize, "_bitsandbytes_version", lambda: Version("0.43.1"))
    with pytest.raises(UnsupportedError, match="on CPU needs bitsandbytes >= 0.46.0 .* 0.43.1 is installed"):
        check_quantization_backend(QuantSettings(), "cpu")
    check_quantization_backend(QuantSettings(), "cuda")  # old releases have CUDA kernels
    monkeypatch.setattr(quantize, "_bitsandbytes_version", lambda: Version("0.50.0"))
    with pytest.raises(UnsupportedError, match="--qlora on xpu: .* cuda and cpu only"):
        check_quantization_backend(QuantSettings(), "xpu")
    with pytest.raises(UnsupportedError, match="--bits 3: QLoRA quantizes to 4 or 8 bits"):
        check_quantization_backend(QuantSettings(bits=3), "cpu")
    with pytest.raises(ConfigError, match="--qlora and --full_finetune exclude each other"):
        finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(tmp_path),
                 do_train=True, qlora=True, full_finetune=True, use_cpu=True)


@pytest.fixture(scope="module")
def qlora_llama_dir(tmp_path_factory, tokenizer):
    """A tiny LLaMA whose linear layers have multiples of 32 outputs: bitsandbytes' 4-bit CPU kernels for
    AVX512 machines pack weights in blocks of 32 rows ("N must be divisible by block_n" otherwise)."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    path = tmp_path_factory.mktemp("qlora-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=64, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("bits,quant_type,double_quant", [(4, "nf4", True), (4, "fp4", False), (8, "nf4", True)])
def test_qlora_trains_a_lora_adapter_on_a_quantized_base(bits, quant_type, double_quant, qlora_llama_dir,
                                                         alpaca_file, tmp_path, trainer_spy):
    import bitsandbytes as bnb

    from lmtune.finetuning import finetune

    out = tmp_path / "out"
    metrics = finetune(
        model_name_or_path=str(qlora_llama_dir), train_file=str(alpaca_file), output_dir=str(out), do_train=True,
        qlora=True, bits=bits, quant_type=quant_type, double_quant=double_quant, lora_all_linear=True,
        max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2, max_seq_length=128, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
    )
    model = trainer_spy[-1].model
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    if bits == 4:
        assert layer.weight.quant_state.quant_type == quant_type
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert metrics["train_loss"] > 0 and min(losses[-2:]) < losses[0], losses
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapter["peft_type"] == "LORA" and {"q_proj", "down_proj"} <= targets
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    # The adapter merges into the full-precision base like any LoRA adapter.
    from lmtune.export.merge import merge_adapter

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(out, tmp_path / "merged"))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
