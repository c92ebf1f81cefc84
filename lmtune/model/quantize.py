"""QLoRA (``--qlora``): load the frozen base model quantized to 4 or 8 bits for LoRA training.

Quantization goes through bitsandbytes (``BitsAndBytesConfig`` handed to
``from_pretrained``, and nothing else: the reference also passed ``load_in_4bit=True``
as a keyword, which recent transformers reject next to a quantization config).
bitsandbytes runs on CUDA and, since 0.46, on CPU (4-bit nf4/fp4 with or without double
quantization, and 8-bit), so the same path serves both; the reference's CPU path needed
Intel's own kernels and failed through its command line.

Contract: ``check_quantization_backend`` raises before any weights load when this
machine cannot run the request, ``quantization_config`` builds the load-time config,
and ``prepare_quantized_model`` readies the loaded model for adapter training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata

import torch
from packaging.version import Version
from transformers import BitsAndBytesConfig, PreTrainedModel

from lmtune.errors import UnsupportedError

logger = logging.getLogger(__name__)

# First bitsandbytes release with a CPU backend for 4-bit and 8-bit layers.
BNB_CPU_MIN = Version("0.46.0")
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class QuantSettings:
    """The QLoRA flags, flat."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def from_flags(cls, bits: int, quant_type: str, double_quant: bool, bf16: bool, fp16: bool) -> QuantSettings:
        """The settings for these flags; matmuls run in the dtype training uses (bf16, fp16, else fp32)."""
        compute = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
        return cls(bits=bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute)


def _bitsandbytes_version() -> Version | None:
    try:
        return Version(metadata.version("bitsandbytes"))
    except metadata.PackageNotFoundError:
        return None


def check_quantization_backend(settings: QuantSettings, device: str) -> None:
    """Refuse, before anything loads, a QLoRA request this machine cannot run, saying what would.

    Args:
        settings: The QLoRA flags.
        device: ``"cuda"``, ``"cpu"``, ``"xpu"`` or ``"hpu"``: where training runs.

    Raises:
        UnsupportedError: bitsandbytes missing or too old, a device it has no kernels for,
            or bits/quant_type it does not offer.
    """
    if settings.bits not in (4, 8):
        raise UnsupportedError(f"--bits {settings.bits}: QLoRA quantizes to 4 or 8 bits; give --bits 4 or --bits 8.")
    if settings.bits == 4 and settings.quant_type not in QUANT_TYPES:
        raise UnsupportedError(f"--quant_type {settings.quant_type}: allowed {', '.join(QUANT_TYPES)}.")
    version = _bitsandbytes_version()
    if version is None:
        raise UnsupportedError(
            "--qlora needs bitsandbytes, which is not installed: `pip install 'bitsandbytes>=0.46'` "
            "(CUDA and CPU), or train without --qlora (LoRA on the unquantized model)."
        )
    if device == "cpu" and version < BNB_CPU_MIN:
        raise UnsupportedError(
            f"--qlora on CPU needs bitsandbytes >= {BNB_CPU_MIN} (its CPU backend); {version} is installed. "
            f"`pip install -U 'bitsandbytes>={BNB_CPU_MIN}'`, or run on a CUDA GPU, or drop --qlora."
        )
    if device not in ("cpu", "cuda"):
        raise UnsupportedError(
            f"--qlora on {device}: lmtune quantizes through bitsandbytes on cuda and cpu only. "
            "Run with --device cuda or --device cpu, or drop --qlora."
        )


def quantization_config(settings: QuantSettings) -> BitsAndBytesConfig:
    """The bitsandbytes config handed to ``from_pretrained`` (the only place bits are given)."""
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=settings.compute_dtype,
    )


def quantized_device_map(device: str) -> dict[str, str]:
    """Put the whole quantized model on this process's device (one GPU per process under DDP)."""
    if device == "cuda":
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"}
    return {"": device}


def prepare_quantized_model(model: PreTrainedModel, *, activation_checkpointing: bool) -> PreTrainedModel:
    """Freeze the quantized weights and ready the model for adapter training (peft's recipe).

    Layer norms and embeddings are upcast to float32 for stable training, and inputs of
    checkpointed blocks get gradients so the adapter below them still learns.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)


def is_quantized(model: PreTrainedModel) -> bool:
    """True for a model loaded through a quantization config."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))
