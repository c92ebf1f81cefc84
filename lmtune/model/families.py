"""Facts about model families that generic code cannot find out by itself.

Everything else is found generically: LoRA targets come from peft's per-model-type table
(every linear layer when a family is missing from it), prompt and prefix geometry from
the config and a one-token probe of the model's cache, packing isolation from a probe of
the loaded model (``lmtune.train.packing_check``), pad/BOS/EOS from the tokenizer and
the model config. A family that is not listed here therefore works without entries;
add one only for a fact that cannot be observed, and say why next to it.

``FAMILY_TRAITS`` is an open table keyed by ``config.model_type``; unknown types get
the defaults of ``FamilyTraits``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class FamilyTraits:
    """What lmtune needs to know about one model family beyond its config.

    Attributes:
        bos_first: The family was pretrained with BOS at the start of every sequence.
            Only consulted when a SentencePiece tokenizer arrives without a
            ``tokenizer_config.json`` saying whether to add BOS: transformers 5 then adds
            none, although these models expect one.
    """

    bos_first: bool = False


# The LLaMA-lineage SentencePiece families: their hub tokenizers set add_bos_token, their
# bare tokenizer.model files cannot say it.
_SENTENCEPIECE_BOS = FamilyTraits(bos_first=True)

FAMILY_TRAITS: dict[str, FamilyTraits] = {
    "llama": _SENTENCEPIECE_BOS,  # LLaMA, LLaMA-2, CodeLlama, llama2.c conversions
    "mistral": _SENTENCEPIECE_BOS,
    "mixtral": _SENTENCEPIECE_BOS,
    "gemma": _SENTENCEPIECE_BOS,
    "gemma2": _SENTENCEPIECE_BOS,
}


def family_traits(model_type: str | None) -> FamilyTraits:
    """The traits of a model type; the defaults for a type lmtune has no entry for."""
    return FAMILY_TRAITS.get(model_type or "", FamilyTraits())


def attention_geometry(config: PretrainedConfig) -> dict[str, int]:
    """Layers, hidden size and attention heads under transformers' standard names.

    Configs spell these differently (``n_layers``/``n_heads``/``d_model`` for MPT,
    ``num_layers``/``d_model`` for T5); reading them as attributes goes through each
    config's ``attribute_map``, which peft's dict lookup of prompt-learning configs misses.
    Returns only the values the config has.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = {"num_layers": "num_hidden_layers", "token_dim": "hidden_size",
             "num_attention_heads": "num_attention_heads"}
    out: dict[str, int] = {}
    for ours, theirs in names.items():
        value = getattr(text, theirs, None)
        if isinstance(value, int) and value > 0:
            out[ours] = value
    return out
