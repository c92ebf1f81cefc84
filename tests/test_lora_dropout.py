"""LoRA's 16-bit dropout mask (``model/lora_dropout.py``): nn.Dropout's distribution, scale and gradient."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from lmtune.model.lora_dropout import LEVELS, SixteenBitDropout, use_sixteen_bit_dropout


def test_every_lane_drops_at_the_rounded_rate_and_keeps_the_expected_value():
    torch.manual_seed(0)
    dropout = SixteenBitDropout(0.05).train()
    out = dropout(torch.ones(4_000_000))
    keep_probability = 1 - round(0.05 * LEVELS) / LEVELS
    values = out.unique()
    assert values[0] == 0 and len(values) == 2
    assert values[1].item() == torch.tensor(1 / keep_probability, dtype=torch.float32).item()
    # Each of the four 16-bit lanes of a 64-bit draw: a lane with a stuck bit would drop 0% or 10%.
    sigma = (0.05 * 0.95 / 1_000_000) ** 0.5
    for lane_rate in (out == 0).double().view(-1, 4).mean(0).tolist():
        assert abs(lane_rate - 0.05) < 5 * sigma
    assert abs(out.double().mean().item() - 1) < 5 * sigma / keep_probability


def test_gradient_is_the_mask_times_the_scale_and_eval_is_the_identity():
    torch.manual_seed(1)
    dropout = SixteenBitDropout(0.3).train()
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(64, 48, dtype=torch.float64)
    out = dropout(x)
    out.backward(upstream)
    kept = out != 0
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    torch.testing.assert_close(out, torch.where(kept, x * scale, 0), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, torch.where(kept, upstream * scale, 0), atol=0, rtol=0)
    assert 0.2 < 1 - kept.double().mean().item() < 0.4
    x_eval = torch.randn(5, 3)
    assert torch.equal(dropout.eval()(x_eval), x_eval)


def test_the_same_seed_draws_the_same_mask():
    dropout = SixteenBitDropout(0.5).train()
    x = torch.ones(1000, dtype=torch.bfloat16)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first) and first.dtype == torch.bfloat16


def test_every_lora_layer_of_a_peft_model_switches_and_saves_the_same_adapter(tmp_path):
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(64)),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    keys_before = set(model.state_dict())
    layers = 2 * model.config.num_hidden_layers
    assert use_sixteen_bit_dropout(model) == layers
    dropouts = [m for m in model.modules() if isinstance(m, SixteenBitDropout)]
    assert len(dropouts) == layers and all(d.p == 0.1 for d in dropouts)
    assert set(model.state_dict()) == keys_before
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    no_dropout = get_peft_model(LlamaForCausalLM(tiny_llama_config(64)),
                                LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    assert use_sixteen_bit_dropout(no_dropout) == 0  # peft's Identity stays
