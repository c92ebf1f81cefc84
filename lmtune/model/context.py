"""The most positions a model takes, and lengths asked of it clamped to that, with a notice.

Training, evaluation and chat all clamp the same way (``fit_to_context``): a 128-position model
is never trained, scored or prompted with 512-token rows, whose positions it has never learned
(absolute position tables fail outright; rotary ones silently degrade).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Config attributes that hold the context length, by family (LLaMA & most; GPT-2/StarCoder; MPT; older).
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def context_length(config) -> int | None:
    """The model's context length, or None when it has no fixed one (T5's relative positions)."""
    if getattr(config, "is_encoder_decoder", False):
        return None
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(length: int, config, flag: str) -> int:
    """``length`` clamped to the model's context length; a notice when it was larger."""
    context = context_length(config)
    if context is None or length <= context:
        return length
    logger.warning("%s %d is more than the model's context of %d positions (max_position_embeddings); using %d.",
                   flag, length, context, context)
    return context
