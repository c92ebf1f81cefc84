"""Prove, on the real model, that packed samples cannot see each other.

Packing relies on the model turning restarting ``position_ids`` into a block-diagonal
mask. Model code that ignores them (or uses ALiBi without positions) would silently let
samples attend across boundaries, which is the reference's packing bug; a two-sample
probe on the loaded model costs one tiny forward pass and rules that out.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lmtune.errors import UnsupportedError


@torch.no_grad()
def check_packing_isolation(model: PreTrainedModel, first: int = 5, second: int = 7) -> None:
    """Compare the logits of two samples run alone and packed into one row.

    Raises:
        UnsupportedError: when the packed logits of the second sample differ from its own.
    """
    was_training = model.training
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    device = model.get_input_embeddings().weight.device
    a = torch.randint(0, vocab, (1, first), generator=generator).to(device)
    b = torch.randint(0, vocab, (1, second), generator=generator).to(device)
    alone = model(input_ids=b, use_cache=False).logits.float()
    positions = torch.cat([torch.arange(first), torch.arange(second)]).unsqueeze(0).to(device)
    try:
        packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits.float()
    except TypeError as err:
        raise UnsupportedError(
            f"model type '{model.config.model_type}' takes no position_ids, so packed samples cannot be kept "
            "apart; drop --dataset_concatenation."
        ) from err
    finally:
        model.train(was_training)
    # Half-precision weights round differently along the two paths; leakage is far larger than that.
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    scale = alone.abs().max().clamp(min=1.0).item()
    if not torch.allclose(packed[:, first:], alone, atol=tolerance * scale, rtol=0):
        raise UnsupportedError(
            f"model type '{model.config.model_type}' lets packed samples attend to each other (its attention "
            "ignores restarting position_ids); drop --dataset_concatenation for this model."
        )
