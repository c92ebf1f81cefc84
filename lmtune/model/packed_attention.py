"""Attention of packed rows computed per sample, not over the whole row behind a mask.

With ``--dataset_concatenation`` a row of ``max_seq_length`` holds several whole samples whose
``position_ids`` restart at 0 (``data/packing.py``). Stock SDPA gets the block-diagonal mask
transformers derives from those positions and computes every (query, key) pair of the row, then
throws away all but the diagonal blocks: with Alpaca's three samples to a 512-token row, most of
the work. Here each sample runs through transformers' own SDPA function alone, with
``is_causal``: on the 134M benchmark model attention fell from 27% to 21% of a training step
(``bench/README.md``), with the same values (float64: to 1e-10; bf16: to rounding).

It is registered under its own name through transformers' public ``AttentionInterface`` (and the
SDPA mask builder under the same name, for every call that is not a packed row), and a model
switches to it only from ``sdpa``. Anything this function cannot reproduce exactly goes to the
stock function with the stock mask: rows without restarting positions (padded batches,
generation) and samples longer than a sliding window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "lmtune_packed_sdpa"
PAD_MULTIPLE = 32


def sample_lengths(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row, the length of each sample in order (a sample starts where positions restart at 0).

    None when no row restarts after its first token: nothing is packed.
    """
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    length = position_ids.shape[-1]
    lengths = []
    for row in starts.tolist():
        begins = [index for index, start in enumerate(row) if start or index == 0]
        lengths.append([end - begin for begin, end in zip(begins, [*begins[1:], length], strict=True)])
    return lengths


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; ``(batch, length, heads, head_dim)`` out, as SDPA's."""
    position_ids = kwargs.get("position_ids")
    same_shape = position_ids is not None and position_ids.shape[-1] == query.shape[2] == key.shape[2]
    lengths = sample_lengths(position_ids.expand(query.shape[0], -1)) if same_shape else None
    # Mistral-style models pass their window with the call, others keep it on the module.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if lengths is None or (window is not None and max(max(row) for row in lengths) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return _attention_by_sample(module, query, key, value, lengths, dropout, scaling), None


def _attention_by_sample(module, query, key, value, lengths: list[list[int]], dropout: float,
                         scaling: float | None) -> torch.Tensor:
    """Causal attention of every sample alone; the block-diagonal mask these lengths spell out, exactly.

    Each sample is right-padded to a multiple of ``PAD_MULTIPLE``: a real query attends only to
    keys at or before it, so the padding behind a sample changes nothing it computes, and the
    CPU kernels see few shapes. PyTorch's bf16 flash attention on CPU keeps compiled kernels for
    every shape it meets: about 2 GB for the 500 sequence lengths of an Alpaca epoch, 77 MB for 8.
    """
    rows = []
    for row_query, row_key, row_value, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), lengths,
                                                  strict=True):
        pieces = []
        # split, not slicing: its backward joins the gradients once instead of adding each piece
        # into a zero-filled copy of the whole tensor.
        for q, k, v in zip(row_query.split(row, dim=1), row_key.split(row, dim=1), row_value.split(row, dim=1),
                           strict=True):
            size = q.shape[1]
            padding = (0, 0, 0, -size % PAD_MULTIPLE)
            out = sdpa_attention_forward(
                module, *(F.pad(t, padding).unsqueeze(0) for t in (q, k, v)), None,
                dropout=dropout, scaling=scaling, is_causal=True,
            )[0]
            pieces.append(out[0, :size])
        rows.append(torch.cat(pieces, dim=0))
    return torch.stack(rows)


def use_packed_attention(model: PreTrainedModel) -> bool:
    """Switch a model that attends with SDPA to ``packed_sdpa_attention``; True if it switched.

    The packing probe (``train/packing_check.py``) then proves, on this model, that packed samples
    compute what they compute alone.
    """
    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return True
