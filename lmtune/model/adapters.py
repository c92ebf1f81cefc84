"""Wrap a loaded model with the adapter the run asks for (``--peft``), through peft.

Contract: ``apply_adapter`` returns a ``peft.PeftModel`` whose only trainable parameters
are the adapter's, or raises ``ConfigError`` before any training step when peft cannot
run that method on that model (checked by rule where one is known, and by one tiny
forward pass of the adapted model otherwise). Method names resolve through
``PEFT_METHODS``, an explicit table; no name is imported by string.

Model-family knowledge is found generically (peft's target tables, the config's
attribute names, a probe of the model's cache); ``lmtune.model.families`` holds the few
facts that cannot be observed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import (
    AdaptionPromptConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG as ADAPTION_PROMPT_MODELS
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from transformers import PreTrainedModel

from lmtune.errors import ConfigError
from lmtune.model.families import attention_geometry

logger = logging.getLogger(__name__)

# Methods that feed learned virtual tokens in front of the input (peft's "prompt learning").
PROMPT_LEARNING = ("ptun", "prefix", "prompt")


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter hyperparameters, flat, as the CLI flags name them."""

    peft: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    lora_all_linear: bool = False
    use_dora: bool = False
    use_rslora: bool = False
    adapter_layers: int = 30
    adapter_len: int = 10
    num_virtual_tokens: int = 10
    ptun_hidden_size: int = 1024


def _linear_leaf_names(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """One linear module per leaf name, the output head excluded (it is tied or too large to adapt)."""
    head = model.get_output_embeddings()
    out: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if module is not head and isinstance(module, torch.nn.Linear) and name:
            out.setdefault(name.rsplit(".", 1)[-1], module)
    return out


def default_target_modules(model: PreTrainedModel) -> list[str] | str:
    """The family's usual LoRA targets (peft's table), else every linear layer.

    Returns:
        Module names, or ``"all-linear"`` for a family neither table knows.
    """
    model_type = model.config.model_type
    peft_table = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    targets = peft_table.get(model_type)
    present = set(_linear_leaf_names(model))
    if targets and present.intersection(targets):
        return list(targets)
    logger.info("no default LoRA targets for model type '%s'; adapting every linear layer.", model_type)
    return "all-linear"


def _lora(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    if settings.lora_all_linear:
        targets: list[str] | str = "all-linear"
    elif settings.lora_target_modules:
        targets = list(settings.lora_target_modules)
    else:
        targets = default_target_modules(model)
    return LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, bias="none", task_type=task_type,
        use_dora=settings.use_dora, use_rslora=settings.use_rslora,
    )


def _ia3(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    """IA3 on peft's targets for the family; else on every linear layer, feed-forward = the down-projections."""
    model_type = model.config.model_type
    linears = _linear_leaf_names(model)
    targets = [t for t in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type, []) if t in linears]
    if settings.lora_target_modules:
        targets = list(settings.lora_target_modules)
    if targets:
        feedforward = [f for f in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
                       if f in targets]
    else:
        targets = sorted(linears)
        # IA3 scales a feed-forward layer's input and any other layer's output; a layer that
        # narrows its input (down_proj, fc2, dense_4h_to_h) is the feed-forward output side.
        feedforward = [n for n, m in linears.items() if m.in_features > m.out_features]
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)


def _check_llama_adapter_family(model: PreTrainedModel) -> None:
    model_type = model.config.model_type
    if model_type not in ADAPTION_PROMPT_MODELS:
        raise ConfigError(
            "--peft llama_adapter: peft's LLaMA-Adapter supports model types "
            f"{', '.join(sorted(ADAPTION_PROMPT_MODELS))}; "
            f"this model is '{model_type}'. Use --peft lora (or prefix, prompt, ptun) for this model."
        )


def _llama_adapter(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    _check_llama_adapter_family(model)
    layers = attention_geometry(model.config).get("num_layers", settings.adapter_layers)
    adapter_layers = settings.adapter_layers
    if adapter_layers > layers:
        logger.warning("--adapter_layers %d is more than the model's %d layers; using %d.",
                       adapter_layers, layers, layers)
        adapter_layers = layers
    return AdaptionPromptConfig(adapter_layers=adapter_layers, adapter_len=settings.adapter_len, task_type=task_type)


@torch.no_grad()
def _cache_geometry(model: PreTrainedModel) -> dict[str, int] | None:
    """Layers and per-layer key width of the model's KV cache, read from a one-token forward pass.

    The cache holds fewer heads than the attention under grouped or multi-query attention,
    and configs name that differently per family (``num_key_value_heads``, ``num_kv_heads``
    with ``multi_query``, ...); the cache itself is the one reliable source. None when the
    model returns no per-layer key tensors.
    """
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        cache = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True).past_key_values
    finally:
        model.train(was_training)
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    if keys is None or keys.dim() != 4:
        return None
    _, heads, _, head_dim = keys.shape
    return {"num_layers": len(layers), "num_attention_heads": heads, "token_dim": heads * head_dim}


def _prompt_geometry(model: PreTrainedModel, prefix: bool) -> dict[str, int]:
    geometry = attention_geometry(model.config)
    if prefix and not model.config.is_encoder_decoder:
        geometry.update(_cache_geometry(model) or {})
    return geometry


def _ptun(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    geometry = _prompt_geometry(model, prefix=False)
    return PromptEncoderConfig(
        num_virtual_tokens=settings.num_virtual_tokens, encoder_hidden_size=settings.ptun_hidden_size,
        task_type=task_type, **geometry,
    )


def _prefix(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    geometry = _prompt_geometry(model, prefix=True)
    return PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type, **geometry)


def _prompt(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    geometry = _prompt_geometry(model, prefix=False)
    return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type, **geometry)


PEFT_METHODS: dict[str, Callable[[AdapterSettings, PreTrainedModel, TaskType], PeftConfig]] = {
    "lora": _lora,
    "ia3": _ia3,
    "llama_adapter": _llama_adapter,
    "ptun": _ptun,
    "prefix": _prefix,
    "prompt": _prompt,
}


def build_peft_config(settings: AdapterSettings, model: PreTrainedModel) -> PeftConfig:
    """Translate the flags into a peft config for this model.

    Raises:
        ConfigError: for an unknown method name, or a method peft has for other families only.
    """
    if settings.peft not in PEFT_METHODS:
        raise ConfigError(f"--peft {settings.peft} is unknown; choose one of {', '.join(PEFT_METHODS)}.")
    task_type = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    return PEFT_METHODS[settings.peft](settings, model, task_type)


def check_method_allowed(peft: str, *, packed: bool) -> None:
    """Rules that need no model: checked before anything loads.

    Raises:
        ConfigError: for a prompt-learning method with packed rows.
    """
    if packed and peft in PROMPT_LEARNING:
        raise ConfigError(
            f"--peft {peft} with --dataset_concatenation: peft puts the virtual tokens in front of each row "
            "and drops position_ids, so packed samples would see each other and only the first would see the "
            "prompt. Drop --dataset_concatenation for this method, or use --peft lora."
        )


@torch.no_grad()
def _smoke_forward(peft_model: PeftModel, method: str) -> None:
    """Run two tokens through the adapted model so a method peft cannot run fails now, not at step 1."""
    base_config = peft_model.get_base_model().config
    device = peft_model.get_input_embeddings().weight.device
    ids = torch.ones((1, 2), dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if base_config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    was_training = peft_model.training
    peft_model.eval()
    try:
        peft_model(**inputs)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(
            f"--peft {method} does not run on model type '{base_config.model_type}' with peft: "
            f"{type(err).__name__}: {err}. "
            "Use --peft lora, which every family supports."
        ) from err
    finally:
        peft_model.train(was_training)


def apply_adapter(model: PreTrainedModel, settings: AdapterSettings, *, packed: bool = False) -> PeftModel:
    """Freeze the base model and attach the adapter.

    Args:
        model: The loaded (possibly quantized) base model.
        settings: The adapter flags.
        packed: Rows hold several samples (``--dataset_concatenation``).

    Raises:
        ConfigError: when peft cannot apply or run the method on this model family, said before training.
    """
    check_method_allowed(settings.peft, packed=packed)
    config = build_peft_config(settings, model)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ConfigError(
            f"--peft {settings.peft} cannot be applied to model type '{model.config.model_type}': {err}"
        ) from err
    _smoke_forward(peft_model, settings.peft)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("adapter %s: %d trainable parameters of %d (%.3f%%).",
                settings.peft, trainable, total, 100 * trainable / max(total, 1))
    return peft_model
