"""Load the tokenizer and the pretrained model, with the dtype and device the run asks for.

Contract: ``load_tokenizer`` returns a tokenizer that has EOS and pad tokens and pads on
the right (training); generation code switches to left padding itself. ``load_model``
returns a causal LM or seq2seq model in the requested dtype. Nothing here knows about
adapters or training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)


def load_config(
    name_or_path: str,
    *,
    config_name: str | None = None,
    revision: str = "main",
    token: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> PretrainedConfig:
    """Load the model config (cheap: no weights), which decides causal vs seq2seq.

    Raises:
        ConfigError: when the path holds no model, or the model needs --trust_remote_code.
    """
    source = config_name or name_or_path
    try:
        return AutoConfig.from_pretrained(
            source, revision=revision, token=token, trust_remote_code=trust_remote_code, cache_dir=cache_dir
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{source} ships its own model code; pass --trust_remote_code True if you trust it."
            ) from err
        raise ConfigError(f"--model_name_or_path {source}: {err}") from err
    except OSError as err:
        raise ConfigError(
            f"--model_name_or_path {source}: no model config found ({err}). Give a local model directory "
            "holding config.json, or a hub id reachable from this machine."
        ) from err


def is_seq2seq(config: PretrainedConfig) -> bool:
    """True for encoder-decoder models (T5, FLAN-T5, BART)."""
    return bool(getattr(config, "is_encoder_decoder", False))


def load_tokenizer(
    name_or_path: str,
    *,
    tokenizer_name: str | None = None,
    use_fast: bool = True,
    revision: str = "main",
    token: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    special_tokens: list[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make it ready for training.

    ``tokenizer_name`` may be a directory, a hub id or a single ``tokenizer.json`` file
    (MPT's gpt-neox-20b tokenizer is often kept that way). A missing pad token becomes
    the EOS token: padding positions are masked by the collator, never by pad id.

    Raises:
        ConfigError: when the tokenizer cannot be loaded or has no EOS token.
    """
    source = tokenizer_name or name_or_path
    try:
        if source.endswith(".json") and Path(source).is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                source, use_fast=use_fast, revision=revision, token=token,
                trust_remote_code=trust_remote_code, cache_dir=cache_dir,
            )
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {source}: cannot be loaded: {err}") from err
    if tokenizer.eos_token is None:
        guess = next((t for t in ("</s>", "<|endoftext|>", "<eos>") if t in tokenizer.get_vocab()), None)
        if guess is None:
            raise ConfigError(f"tokenizer {source} defines no EOS token; set eos_token in tokenizer_config.json.")
        logger.warning("tokenizer %s defines no EOS token; using %s found in its vocabulary.", source, guess)
        tokenizer.eos_token = guess
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_dtype(bf16: bool, fp16: bool, full_finetune: bool) -> torch.dtype:
    """Weights dtype for loading.

    Adapter training keeps the frozen base in half precision (memory, speed) while the
    adapter stays float32 and autocast runs the matmuls in bf16/fp16. Full fine-tuning
    keeps float32 master weights: training bf16 weights directly loses small updates
    (the reference cast everything, adapters included, to bf16).
    """
    if full_finetune or not (bf16 or fp16):
        return torch.float32
    return torch.bfloat16 if bf16 else torch.float16


def load_model(
    name_or_path: str,
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    revision: str = "main",
    token: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """Load pretrained weights as a causal LM, or a seq2seq LM for encoder-decoder configs.

    Raises:
        ConfigError: when the weights cannot be loaded.
    """
    auto = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            name_or_path, config=config, dtype=dtype, revision=revision, token=token,
            trust_remote_code=trust_remote_code, cache_dir=cache_dir,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model_name_or_path {name_or_path}: weights cannot be loaded: {err}") from err
    return model


def fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding matrix when the tokenizer has more tokens than the model rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        logger.info("resizing embeddings %d -> %d for added tokens.", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
