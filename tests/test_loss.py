"""The chunked hidden-state loss equals the stock causal-LM loss, in value and in gradient.

Checked in float32 on small vocabularies: the raw summed loss against ``F.cross_entropy``,
then ``LmtuneTrainer.compute_loss`` against the stock ``Trainer.compute_loss`` on tiny
random models (LoRA and full fine-tuning), with and without ``num_items_in_batch``, and
gradient accumulation (two micro-batches sharing one ``num_items_in_batch``) against
one big batch; and in float64, to 1e-10, against the head run on every position (LoRA and
full fine-tuning, padded and packed rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from lmtune.data.render import IGNORE_INDEX
from lmtune.train.loss import causal_lm_loss_sum, shifted_targets
from lmtune.train.trainer import (
    PLAIN_HEAD_MODEL_TYPES,
    LmtuneTrainer,
    _plain_head_parts,
)
from tests.conftest import tiny_llama_config

VOCAB = 97


def _labels(generator: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[0, -2:] = IGNORE_INDEX  # right padding
    return labels


def _stock_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, VOCAB), shifted_targets(labels).reshape(-1), reduction="sum")


def test_shifted_targets_moves_labels_left_and_ignores_the_last_position():
    labels = torch.tensor([[5, 6, 7], [IGNORE_INDEX, 8, 9]])
    assert shifted_targets(labels).tolist() == [[6, 7, IGNORE_INDEX], [8, 9, IGNORE_INDEX]]


@pytest.mark.parametrize("rows", [1, 4, 1000])
def test_loss_sum_and_gradients_equal_the_stock_cross_entropy(rows):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 8, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=generator, requires_grad=True)
    labels = _labels(generator, 3, 11)

    total, count = causal_lm_loss_sum(hidden, weight, labels, rows=rows)
    (total * 0.37).backward()  # a non-unit incoming gradient, as after dividing by a token count
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _stock_sum(hidden, weight, labels)
    (expected * 0.37).backward()

    assert count.item() == (shifted_targets(labels) != IGNORE_INDEX).sum().item() == 3 * 8 - 2
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_skips_gradients():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=generator)  # frozen
    labels = _labels(generator, 2, 6)
    total, _ = causal_lm_loss_sum(hidden, weight, labels, rows=2)
    total.backward()
    assert weight.grad is None and hidden.grad.abs().sum() > 0
    with torch.no_grad():
        again, _ = causal_lm_loss_sum(hidden, weight, labels, rows=2)
    torch.testing.assert_close(again, total.detach())


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradient():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(VOCAB, 8)
    total, count = causal_lm_loss_sum(hidden, weight, torch.full((1, 4), IGNORE_INDEX))
    total.backward()
    assert total.item() == 0.0 and count.item() == 0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


# --- the Trainer hook against the stock Trainer -------------------------------------------------


def _trainers(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    return LmtuneTrainer(model=model, args=args), Trainer(model=model, args=args)


def _batch(seed: int, batch: int = 2, seq: int = 9, packed: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, :2] = IGNORE_INDEX
    labels[-1, -3:] = IGNORE_INDEX
    out = {"input_ids": input_ids, "labels": labels}
    if packed:  # two samples per row, positions restarting, no attention mask
        out["position_ids"] = torch.cat([torch.arange(4), torch.arange(seq - 4)]).repeat(batch, 1)
        labels[:, 4] = IGNORE_INDEX
    else:
        out["attention_mask"] = torch.ones_like(input_ids)
        out["attention_mask"][-1, -3:] = 0
    return out


def _lora_model(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type=TaskType.CAUSAL_LM, init_lora_weights=False)
    return get_peft_model(model, config)


def _loss_and_grads(trainer, model, batches, num_items):
    model.zero_grad()
    losses = []
    for batch in batches:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads


def _assert_same(ours, stock):
    torch.testing.assert_close(ours[0], stock[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == stock[1].keys() and ours[1]
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], stock[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_items", [None, 23])
def test_compute_loss_equals_the_stock_trainer_for_lora(tmp_path, packed, num_items):
    model = _lora_model()
    model.train()
    ours, stock = _trainers(model, tmp_path)
    assert _plain_head_parts(model) is not None
    batches = [_batch(0, packed=packed)]
    _assert_same(_loss_and_grads(ours, model, batches, num_items), _loss_and_grads(stock, model, batches, num_items))


def test_compute_loss_equals_the_stock_trainer_for_full_finetuning(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB))
    ours, stock = _trainers(model, tmp_path)
    batches = [_batch(1)]
    _assert_same(_loss_and_grads(ours, model, batches, 15), _loss_and_grads(stock, model, batches, 15))
    assert model.lm_head.weight.requires_grad


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches divided by the shared label count == one batch of both (what GA 2x1 vs 1x2 needs)."""
    model = _lora_model(seed=2)
    ours, _ = _trainers(model, tmp_path)
    first, second = _batch(3, batch=1), _batch(4, batch=1)
    both = {key: torch.cat([first[key], second[key]]) for key in first}
    count = sum((shifted_targets(b["labels"]) != IGNORE_INDEX).sum() for b in (first, second))
    micro_losses, micro_grads = _loss_and_grads(ours, model, [first, second], count)
    big_loss, big_grads = _loss_and_grads(ours, model, [both], None)  # mean over the same tokens
    torch.testing.assert_close(micro_losses.sum(), big_loss[0], rtol=1e-5, atol=1e-6)
    for name in big_grads:
        torch.testing.assert_close(micro_grads[name], big_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_and_return_outputs_keep_the_stock_path(tmp_path):
    model = _lora_model()
    ours, _ = _trainers(model, tmp_path)
    loss, outputs = ours.compute_loss(model, _batch(5), return_outputs=True)
    assert outputs.logits.shape == (2, 9, VOCAB)
    torch.testing.assert_close(loss, outputs.loss)


def test_prompt_tuning_and_unknown_heads_fall_back_to_the_stock_loss():
    torch.manual_seed(0)
    prompt = get_peft_model(LlamaForCausalLM(tiny_llama_config(VOCAB)),
                            PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2))
    assert _plain_head_parts(prompt) is None
    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma2", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert _plain_head_parts(gemma2) is None  # logit soft-capping: not a plain head
    assert _plain_head_parts(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)) is None


_TINY = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_MODEL_TYPES))
def test_every_plain_head_family_matches_its_own_loss(tmp_path, model_type):
    settings = dict(_TINY, head_dim=4) if model_type in ("qwen3", "gemma") else dict(_TINY)
    if model_type == "gpt_neox":
        settings.pop("num_key_value_heads")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    ours, stock = _trainers(model, tmp_path)
    assert _plain_head_parts(model) is not None
    batches = [_batch(6)]
    _assert_same(_loss_and_grads(ours, model, batches, 12), _loss_and_grads(stock, model, batches, 12))


def test_bf16_autocast_stays_close_to_the_stock_loss(tmp_path):
    model = _lora_model()
    ours, stock = _trainers(model, tmp_path)
    batch = _batch(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_loss = ours.compute_loss(model, dict(batch))
        stock_loss = stock.compute_loss(model, dict(batch))
    torch.testing.assert_close(ours_loss.float(), stock_loss.float(), rtol=2e-2, atol=2e-2)


# --- float64: the same numbers as the full computation, to rounding -----------------------------


def _assert_same_f64(ours, stock):
    torch.testing.assert_close(ours[0], stock[0], rtol=0, atol=1e-10)
    assert ours[1].keys() == stock[1].keys() and ours[1]
    for name in ours[1]:
        assert ours[1][name].dtype == torch.float64
        torch.testing.assert_close(ours[1][name], stock[1][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("rows", [3, 1000])
def test_float64_loss_sum_and_gradients_equal_the_full_logits_to_1e_10(rows):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = _labels(generator, 3, 11)
    total, _ = causal_lm_loss_sum(hidden, weight, labels, rows=rows)
    assert total.dtype == torch.float64
    total.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    _stock_sum(hidden, weight, labels).backward()
    torch.testing.assert_close(total, _stock_sum(hidden, weight, labels), rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], weight.grad, rtol=0, atol=1e-10)
    assert grads[0][0, -3:].abs().max() == 0  # positions without a label get no head gradient at all


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("packed", [False, True])
def test_float64_compute_loss_equals_the_stock_trainer_to_1e_10(tmp_path, full, packed):
    if full:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(VOCAB))
    else:
        model = _lora_model()
    model.to(torch.float64).train()
    ours, _ = _trainers(model, tmp_path)
    batch = _batch(8, packed=packed)
    # The full computation: the head on every position, float64 logits (the stock loss would upcast to float32).
    full_head = _FullLogitsLoss()
    _assert_same_f64(_loss_and_grads(ours, model, [batch], 17), _loss_and_grads(full_head, model, [batch], 17))


class _FullLogitsLoss:
    def compute_loss(self, model, inputs, num_items_in_batch):
        labels = inputs.pop("labels")
        logits = model(**inputs, use_cache=False).logits
        assert logits.dtype == torch.float64
        targets = shifted_targets(labels).reshape(-1)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets, reduction="sum") / num_items_in_batch
