"""Causal-LM cross-entropy straight from hidden states, without the full logits tensor.

The stock path computes ``lm_head`` on every position of the batch, upcasts all logits to
float32 and keeps them (and their log-softmax) for backward: batch x seq x vocab floats,
several GB for a 256K vocabulary. Here the head runs only on positions that carry a label
(prompt tokens are often half of instruction data), in row chunks whose logits are
dropped as soon as their gradient is known. The loss and gradients are the stock ones:
``sum`` over supervised tokens, divided by the caller (token count, or the Trainer's
``num_items_in_batch`` so gradient accumulation stays exact).
"""

from __future__ import annotations

import torch

from lmtune.data.render import IGNORE_INDEX

# Rows of logits per chunk. Each chunk reads the whole head weight twice (logits, hidden gradient),
# so chunks sized by memory alone get slow for large vocabularies: 16 rows of a 256K head made the
# head + loss 3.2x slower in float32 than 256 rows (28.6 against 9.0 s, 4 x 512 positions, idle
# AVX512 machine; bench/README.md), and 256 rows were within 5% of the fastest on 32K and 256K, in
# float32 and bf16. A chunk's float32 logits: 32 MB at 32K, 256 MB at 256K (the stock path: 4 GB).
CHUNK_ROWS = 256


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients computed chunk by chunk in forward.

    Forward already knows d loss / d logits (softmax minus one-hot), so it turns each chunk's
    logits into the hidden (and, when trained, weight) gradient at once and frees them;
    backward only scales those by the incoming gradient. Same matmul count as the stock path.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _accumulation_dtype(weight.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        # The caller cast both operands to the compute dtype; autocast must not re-cast them here.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows]
                t = targets[start : start + rows]
                logits = (h @ weight.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
                if not (need_hidden or need_weight):
                    continue
                grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(weight.dtype)
                if need_hidden:
                    grad_hidden[start : start + rows] = grad_logits @ weight
                if need_weight:
                    grad_weight += (grad_logits.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(_accumulation_dtype(ctx.weight_dtype))
        hidden_out = (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None
        weight_out = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return hidden_out, weight_out, None, None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision and float32 logits (as the stock loss upcasts them); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one left (position t predicts token t+1), IGNORE_INDEX at each row's end."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's when it is on (as for the stock lm_head), else promoted."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def causal_lm_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions, and their count.

    Args:
        hidden: Final hidden states, ``(batch, seq, hidden)``.
        weight: The output head's weight, ``(vocab, hidden)`` (a bias-free head).
        labels: ``(batch, seq)`` token ids, IGNORE_INDEX where unsupervised (not yet shifted).
        rows: Rows per chunk; by default ``CHUNK_ROWS``.

    Returns:
        ``(loss_sum, count)``: the summed loss (differentiable; float32, or float64 for a float64 head)
        and the number of supervised tokens.
    """
    targets = shifted_targets(labels).reshape(-1)
    keep = targets != IGNORE_INDEX
    dtype = compute_dtype(hidden, weight)
    selected = hidden.reshape(-1, hidden.shape[-1])[keep].to(dtype)
    total = _LinearCrossEntropySum.apply(
        selected, weight.to(dtype), targets[keep], rows or CHUNK_ROWS
    )
    return total, keep.sum()
