"""Frozen weights kept in bf16, arithmetic in float32: ``--bf16`` on a CPU without bf16 units.

Where bf16 matrix multiplies are emulated (no AMX or AVX512-BF16, see ``train/cpu.py``),
computing in bf16 is many times slower than float32, but storing the frozen base model in
bf16 still halves its memory, as the user asked with ``--bf16``. ``upcast_compute`` makes a
bf16-loaded model compute in float32: each frozen linear layer casts its weight to float32
for the one multiply that needs it, and saves only the bf16 weight for backward (a frozen
weight needs no gradient, so the layer input is not kept either). Embeddings hand float32
to the first layer; the small parameters (norms) become float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenUpcastLinear(torch.autograd.Function):
    """y = x @ W.float().T + b, with a gradient for x only; W stays bf16 between uses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.to(grad_output.dtype), None, None


class UpcastLinear(nn.Linear):
    """An ``nn.Linear`` whose low-precision weight is cast to the input's dtype on every call.

    Trainable weights (full fine-tuning, a merged adapter being trained again) take the
    ordinary autograd path; frozen ones keep no float32 copy and no saved input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if frozen and torch.is_grad_enabled():
            return _FrozenUpcastLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _float_embedding_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def upcast_compute(model: nn.Module) -> nn.Module:
    """Make a half-precision model compute in float32 while its big weights stay half precision.

    Every plain ``nn.Linear`` becomes an :class:`UpcastLinear` sharing the same parameters
    (state dict keys and tied weights unchanged, so adapters attach and save as usual);
    embeddings return float32; all other floating parameters and buffers become float32.

    Returns:
        The same model, changed in place.
    """
    keep_half: set[int] = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Only plain nn.Linear: a subclass (Falcon's FalconLinear) has a forward of its own that
            # would multiply a float32 input by a bf16 weight, so its weights become float32 below.
            if type(child) is nn.Linear:
                upcast = UpcastLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta")
                upcast.weight, upcast.bias = child.weight, child.bias  # the same Parameters: ties survive
                setattr(parent, name, upcast)
                keep_half.update(id(p) for p in upcast.parameters(recurse=False))
            elif isinstance(child, nn.Embedding):
                keep_half.update(id(p) for p in child.parameters(recurse=False))
                child.register_forward_hook(_float_embedding_output)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point() and id(tensor) not in keep_half and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
    return model
