"""Wrap a loaded model with the adapter the run asks for (``--peft``), through peft.

Contract: ``apply_adapter`` returns a ``peft.PeftModel`` whose only trainable parameters
are the adapter's, or the model itself for ``--full_finetune``. Method names resolve
through ``PEFT_METHODS``, an explicit table; no name is imported by string.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)


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


def default_target_modules(model: PreTrainedModel) -> list[str] | str:
    """The model family's usual LoRA targets (peft's table), or every linear layer for a family it lacks."""
    model_type = model.config.model_type
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        logger.info("no default LoRA targets for model type '%s'; adapting every linear layer.", model_type)
        return "all-linear"
    return list(targets)


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
    return IA3Config(task_type=task_type)


def _llama_adapter(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    layers = model.config.num_hidden_layers
    adapter_layers = settings.adapter_layers
    if adapter_layers > layers:
        logger.warning("--adapter_layers %d is more than the model's %d layers; using %d.",
                       adapter_layers, layers, layers)
        adapter_layers = layers
    return AdaptionPromptConfig(adapter_layers=adapter_layers, adapter_len=settings.adapter_len, task_type=task_type)


def _ptun(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    return PromptEncoderConfig(
        num_virtual_tokens=settings.num_virtual_tokens, encoder_hidden_size=settings.ptun_hidden_size,
        task_type=task_type,
    )


def _prefix(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)


def _prompt(settings: AdapterSettings, model: PreTrainedModel, task_type: TaskType) -> PeftConfig:
    return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)


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
        ConfigError: for an unknown method name.
    """
    if settings.peft not in PEFT_METHODS:
        raise ConfigError(f"--peft {settings.peft} is unknown; choose one of {', '.join(PEFT_METHODS)}.")
    task_type = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    return PEFT_METHODS[settings.peft](settings, model, task_type)


def apply_adapter(model: PreTrainedModel, settings: AdapterSettings) -> PeftModel:
    """Freeze the base model and attach the adapter.

    Raises:
        ConfigError: when peft cannot apply the method to this model family, said before training.
    """
    config = build_peft_config(settings, model)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ConfigError(
            f"--peft {settings.peft} cannot be applied to model type '{model.config.model_type}': {err}"
        ) from err
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("adapter %s: %d trainable parameters of %d (%.3f%%).",
                settings.peft, trainable, total, 100 * trainable / max(total, 1))
    return peft_model
