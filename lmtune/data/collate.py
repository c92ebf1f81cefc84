"""Stage 5: samples -> padded tensors for one batch.

Written here rather than taken from ``DataCollatorForSeq2Seq`` because packed rows must
reach the model with ``position_ids`` and WITHOUT an attention mask (an all-ones mask
would switch off transformers' block-diagonal mask for packed sequences), and the
stock collators neither pad ``position_ids`` nor leave the mask out. Models whose
attention ignores ``position_ids`` (ALiBi, e.g. MPT) get the block-diagonal mask spelled
out as a 4D additive mask instead (``block_mask_dtype``); the packing probe decides which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmtune.data.render import IGNORE_INDEX


def block_diagonal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D additive causal mask ``(batch, 1, L, L)`` that keeps each packed sample to itself.

    A sample starts wherever ``position_ids`` restarts at 0. Allowed entries are 0 and
    blocked ones the dtype's minimum: the form transformers passes through to every
    attention implementation unchanged (eager adds it, SDPA takes it as a float mask, and
    MPT's ALiBi attention blocks its non-zero entries).
    """
    segment = torch.cumsum((position_ids == 0).long(), dim=-1)
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones((length, length), dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and ``position_ids`` or ``attention_mask``.

    Rows that carry ``position_ids`` (packed) get their padding as one more segment whose
    positions restart at 0, so padding never changes what real tokens attend to; other
    rows get an ``attention_mask`` that is 0 on padding. With ``block_mask_dtype`` set,
    packed rows also get the block-diagonal 4D ``attention_mask`` in that dtype.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    max_length: int | None = None
    block_mask_dtype: torch.dtype | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        length = _round_up(longest, self.pad_to_multiple_of)
        if self.max_length is not None:
            length = max(longest, min(length, self.max_length))
        packed = "position_ids" in features[0]
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((batch, length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            if packed:
                extra[row, :n] = torch.as_tensor(feature["position_ids"])
                extra[row, n:] = torch.arange(length - n)
            else:
                extra[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels}
        out["position_ids" if packed else "attention_mask"] = extra
        if packed and self.block_mask_dtype is not None:
            out["attention_mask"] = block_diagonal_mask(extra, self.block_mask_dtype)
        return out
