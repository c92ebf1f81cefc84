"""Packed rows attend per sample (``model/packed_attention.py``): the same logits and gradients as
stock SDPA behind transformers' block-diagonal mask, and as each sample alone, in float64."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from conftest import tiny_llama_config
from lmtune.model.packed_attention import PACKED_SDPA, sample_lengths, use_packed_attention
from lmtune.train.packing_check import PACK_BY_POSITIONS, check_packing_isolation

VOCAB = 64
# Row 0: three samples and a padding segment (its positions restart too, as the collator writes them);
# row 1: one sample filling the row; row 2: two samples.
POSITIONS = torch.tensor([
    [*range(7), *range(9), *range(5), *range(3)],
    [*range(24)],
    [*range(11), *range(13)],
])


def _model(model_cls=LlamaForCausalLM, config=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_cls(config or tiny_llama_config(VOCAB)).double()
    model.config.use_cache = False  # as training sets it: with a cache transformers builds no packed mask
    return model


def _logits_and_grads(model, input_ids, position_ids, **extra):
    model.zero_grad()
    out = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids, **extra)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_sample_lengths_follow_restarting_positions():
    assert sample_lengths(POSITIONS) == [[7, 9, 5, 3], [24], [11, 13]]
    assert sample_lengths(torch.arange(24).expand(3, -1)) is None  # nothing packed


def test_packed_rows_compute_what_stock_sdpa_with_the_block_mask_computes():
    input_ids = torch.randint(0, VOCAB, POSITIONS.shape, generator=torch.Generator().manual_seed(1))
    model = _model()
    stock_logits, stock_grads = _logits_and_grads(model, input_ids, POSITIONS)
    assert use_packed_attention(model) and model.config._attn_implementation == PACKED_SDPA
    logits, grads = _logits_and_grads(model, input_ids, POSITIONS)
    torch.testing.assert_close(logits, stock_logits, atol=1e-10, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, stock_grads[name], atol=1e-10, rtol=0, msg=name)
    # and what each sample computes alone
    start = 7
    alone = model(input_ids=input_ids[:1, start : start + 9]).logits.detach()
    torch.testing.assert_close(logits[:1, start : start + 9], alone, atol=1e-10, rtol=0)
    assert check_packing_isolation(model.float()) == PACK_BY_POSITIONS


def test_padded_batches_and_generation_take_the_stock_path_unchanged():
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    model = _model()
    stock = model(input_ids=input_ids, attention_mask=attention_mask).logits
    use_packed_attention(model)
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, stock)
    model.config.use_cache = True
    generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(input_ids[:1], max_new_tokens=4, do_sample=False), generated)


def test_a_sample_longer_than_the_sliding_window_keeps_the_stock_mask():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=32, sliding_window=6)
    input_ids = torch.randint(0, VOCAB, POSITIONS.shape, generator=torch.Generator().manual_seed(3))
    model = _model(MistralForCausalLM, config)
    stock_logits, _ = _logits_and_grads(model, input_ids, POSITIONS)
    use_packed_attention(model)
    logits, _ = _logits_and_grads(model, input_ids, POSITIONS)
    torch.testing.assert_close(logits, stock_logits, atol=1e-10, rtol=0)


def test_only_sdpa_models_switch_and_a_saved_model_does_not_name_the_function(tmp_path):
    eager = LlamaForCausalLM(tiny_llama_config(VOCAB, attn_implementation="eager"))
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"
    model = _model()
    use_packed_attention(model)
    model.save_pretrained(tmp_path)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_stay_within_rounding(dtype):
    input_ids = torch.randint(0, VOCAB, POSITIONS.shape, generator=torch.Generator().manual_seed(4))
    model = _model().to(dtype)
    stock = model(input_ids=input_ids, position_ids=POSITIONS).logits.float()
    use_packed_attention(model)
    packed = model(input_ids=input_ids, position_ids=POSITIONS).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(packed, stock, atol=tolerance * stock.abs().max().item(), rtol=0)
