"""Packing: whole samples, nothing dropped, and a packed batch computes what the unpacked one does."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.data.collate import CausalLMCollator
from lmtune.data.formats import to_examples
from lmtune.data.packing import pack_examples, plan_bins
from lmtune.data.render import IGNORE_INDEX, render_examples
from lmtune.train.packing_check import check_packing_isolation


def test_bins_hold_every_sample_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = plan_bins(lengths, 128)
    members = sorted(i for b in bins for i in b)
    assert members == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Best-fit decreasing wastes little: fewer than 10% more rows than the lower bound.
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1


def test_sample_longer_than_a_row_is_an_error():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than the row length 8"):
        plan_bins([3, 9], 8)


@pytest.fixture
def samples(tokenizer, demo_records):
    examples = to_examples(demo_records[:24], ["instruction", "input", "output"], "demo")
    rendered, _ = render_examples(tokenizer, examples, max_seq_length=256)
    return rendered


def test_packing_conserves_tokens_and_restarts_positions(samples):
    rows, stats = pack_examples(samples, 512)
    assert sorted(t for row in rows["input_ids"] for t in row) == sorted(t for s in samples["input_ids"] for t in s)
    assert sum(len(r) for r in rows["labels"]) == stats.tokens == sum(len(s) for s in samples["input_ids"])
    assert stats.rows < stats.samples and 0 < stats.efficiency <= 1
    for row, positions in zip(rows["input_ids"], rows["position_ids"]):
        assert len(row) == len(positions) <= 512
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert starts[0] == 0
        # Every segment starts with BOS: samples were never split between rows.
        assert all(row[i] == 1 for i in starts)


def test_collator_pads_packed_rows_without_attention_mask(samples):
    rows, _ = pack_examples(samples, 512)
    features = [{k: rows[k][i] for k in rows} for i in range(2)]
    batch = CausalLMCollator(pad_token_id=3)(features)
    assert "attention_mask" not in batch
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= max(len(f["input_ids"]) for f in features)
    shorter = min(range(2), key=lambda i: len(features[i]["input_ids"]))
    n = len(features[shorter]["input_ids"])
    assert batch["position_ids"][shorter, n:].tolist() == list(range(length - n))
    assert (batch["labels"][shorter, n:] == IGNORE_INDEX).all()


def _loss_and_grads(model, batch):
    model.zero_grad()
    items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss  # model.config.use_cache is False
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_equals_unpacked_batch(tiny_llama_dir, samples):
    # float64, so that a difference is leakage between samples, not summation order
    # (transformers computes the cross-entropy itself in float32: hence 1e-6).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    model.config.use_cache = False  # as run_finetune sets it for training
    collator = CausalLMCollator(pad_token_id=3)
    unpacked = collator([{k: samples[k][i] for k in samples} for i in range(len(samples["input_ids"]))])
    rows, _ = pack_examples(samples, 512)
    packed = collator([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()
    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-6, atol=1e-7)
    assert grads_u.keys() == grads_p.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-6, atol=1e-9, msg=name)


def test_isolation_probe_passes_on_llama(tiny_llama_dir):
    check_packing_isolation(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
