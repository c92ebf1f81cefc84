"""Load the tokenizer and the pretrained model, with the dtype and device the run asks for.

Contract: ``load_tokenizer`` returns a tokenizer that has EOS and pad tokens and pads on
the right (training); generation code switches to left padding itself. ``load_model``
returns a causal LM or seq2seq model in the requested dtype. Nothing here knows about
adapters or training.
"""

from __future__ import annotations

import json
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
from lmtune.model.families import family_traits
from lmtune.model.gguf import resolve_model_path

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
    source = resolve_model_path(config_name or name_or_path)
    try:
        if trust_remote_code:
            builtin = _builtin_config(source, revision=revision, token=token, cache_dir=cache_dir)
            if builtin is not None:
                return builtin
        return AutoConfig.from_pretrained(
            source, revision=revision, token=token, trust_remote_code=trust_remote_code, cache_dir=cache_dir
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(source, "model config") from err
        raise ConfigError(f"--model_name_or_path {source}: {err}") from err
    except OSError as err:
        raise ConfigError(
            f"--model_name_or_path {source}: no model config found ({err}). Give a local model directory "
            "holding config.json, or a hub id reachable from this machine."
        ) from err


def _builtin_config(source: str, **kwargs) -> PretrainedConfig | None:
    """transformers' own config for a model type it implements, even where the repository ships code.

    Repositories such as mosaicml/mpt-7b ship modelling code written for an old transformers
    release, for an architecture transformers has since built in and loads the same weights
    with; a local copy often lacks those .py files altogether. The built-in class is then
    used with or without --trust_remote_code. None when transformers lacks the model type.
    """
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (ValueError, OSError):
        return None
    if getattr(config, "auto_map", None):
        logger.info("%s: using transformers' built-in '%s' implementation instead of the code shipped with "
                    "the model.", source, config.model_type)
        del config.auto_map  # else the Auto classes would still reach for the shipped code
    return config


def remote_code_error(source: str, what: str) -> ConfigError:
    """The message for a model whose code ships with it: which files would run, and the opt-in."""
    files: list[str] = []
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        try:
            auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map", {})
        except (ValueError, AttributeError):
            auto_map = {}
        files = sorted({str(ref).split(".")[0] + ".py" for ref in auto_map.values() if isinstance(ref, str)})
    shipped = f" ({', '.join(files)})" if files else ""
    return ConfigError(
        f"{source}: the {what} needs Python code that ships with the model{shipped}, and lmtune does not run "
        "such code unless told to. Read that code, then pass --trust_remote_code True if you trust it."
    )


def _pickle_only_error(source: str) -> ConfigError:
    local = Path(source)
    found = sorted(p.name for p in local.glob("*.bin")) if local.is_dir() else []
    holds = f"holds only pickle weights ({', '.join(found)})" if found else "has no safetensors weights"
    return ConfigError(
        f"--model_name_or_path {source} {holds}. Loading a pickle file can run arbitrary code, so lmtune loads "
        "model weights from safetensors only. Convert the weights to safetensors (load them once where you "
        "trust them and save_pretrained), or pass --allow_pickle_weights True if you trust these files."
    )


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
    model_type: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make it ready for training.

    ``tokenizer_name`` may be a directory, a hub id or a single ``tokenizer.json`` file
    (MPT's gpt-neox-20b tokenizer is often kept that way). A missing pad token becomes
    the EOS token: padding positions are masked by the collator, never by pad id.

    Raises:
        ConfigError: when the tokenizer cannot be loaded or has no EOS token.
    """
    source = resolve_model_path(tokenizer_name or name_or_path)
    try:
        if source.endswith(".json") and Path(source).is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                source, use_fast=use_fast, revision=revision, token=token,
                trust_remote_code=trust_remote_code, cache_dir=cache_dir,
            )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(source, "tokenizer") from err
        raise ConfigError(f"tokenizer {source}: cannot be loaded: {err}") from err
    if tokenizer.eos_token is None:
        guess = next((t for t in ("</s>", "<|endoftext|>", "<eos>") if t in tokenizer.get_vocab()), None)
        if guess is None:
            raise ConfigError(f"tokenizer {source} defines no EOS token; set eos_token in tokenizer_config.json.")
        logger.warning("tokenizer %s defines no EOS token; using %s found in its vocabulary.", source, guess)
        tokenizer.eos_token = guess
    _add_bos_if_family_expects(tokenizer, source, model_type)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.padding_side = "right"
    return tokenizer


def _add_bos_if_family_expects(tokenizer: PreTrainedTokenizerBase, source: str, model_type: str | None) -> None:
    """A bare ``tokenizer.model`` (no tokenizer_config.json) loads with BOS off in transformers 5.

    Hub LLaMA/Mistral/Gemma tokenizers say ``add_bos_token: true`` in their config, and the
    models were pretrained with BOS first; without that file nothing says so, so the
    family's trait decides. A tokenizer config that exists is always obeyed.
    """
    if Path(source, "tokenizer_config.json").is_file() or not Path(source).is_dir():
        return
    if not family_traits(model_type).bos_first or tokenizer.bos_token_id is None:
        return
    if tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id] and hasattr(tokenizer, "add_bos_token"):
        logger.info("tokenizer %s has no tokenizer_config.json; adding BOS %s as '%s' models expect.",
                    source, tokenizer.bos_token, model_type)
        tokenizer.add_bos_token = True


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
    allow_pickle_weights: bool = False,
    quantization_config=None,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load pretrained weights as a causal LM, or a seq2seq LM for encoder-decoder configs.

    ``quantization_config`` (QLoRA, see ``lmtune.model.quantize``) and ``device_map`` pass
    through to ``from_pretrained`` unchanged.

    Weights load from safetensors files only, unless ``allow_pickle_weights`` (pickle ``.bin``
    files can run code when loaded).

    Raises:
        ConfigError: when the weights cannot be loaded, exist only as pickle files (without
            ``allow_pickle_weights``), or need ``trust_remote_code``.
    """
    name_or_path = resolve_model_path(name_or_path)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            name_or_path, config=config, dtype=dtype, revision=revision, token=token,
            trust_remote_code=trust_remote_code, cache_dir=cache_dir,
            use_safetensors=None if allow_pickle_weights else True,
            quantization_config=quantization_config, device_map=device_map,
        )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(name_or_path, "model") from err
        if not allow_pickle_weights and "safetensors" in str(err):
            raise _pickle_only_error(name_or_path) from err
        raise ConfigError(f"--model_name_or_path {name_or_path}: weights cannot be loaded: {err}") from err
    return model


def fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding matrix when the tokenizer has more tokens than the model rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        logger.info("resizing embeddings %d -> %d for added tokens.", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
