"""The one batching loop of log-likelihood scoring, for causal (``multiple_choice``) and
encoder-decoder (``seq2seq_scoring``) models: each brings its own encoding and forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from lmtune.errors import ConfigError
from lmtune.progress_lines import tracked

EncodedPair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def scores_in_batches(
    model: PreTrainedModel,
    requests: list[tuple[str, str]],
    encode: Callable[[str, str], EncodedPair],
    score_batch: Callable[[list[EncodedPair]], list[float]],
    *,
    batch_size: int,
    length: Callable[[EncodedPair], int],
) -> list[float]:
    """One score per request, each distinct request scored once, in eval mode without gradients.

    Requests are deduplicated and sorted longest first (``length`` of their encoding), so batches
    hold similar lengths; the scores come back in the order of ``requests``.

    Raises:
        ConfigError: If ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    unique = list(dict.fromkeys(requests))
    encoded = [encode(context, continuation) for context, continuation in unique]
    order = sorted(range(len(unique)), key=lambda i: -length(encoded[i]))
    scores: dict[tuple[str, str], float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tracked(range(0, len(order), batch_size), -(-len(order) // batch_size), "scoring answers"):
                chunk = order[start : start + batch_size]
                batch_scores = score_batch([encoded[i] for i in chunk])
                scores.update((unique[i], score) for i, score in zip(chunk, batch_scores, strict=True))
    finally:
        model.train(was_training)
    return [scores[request] for request in requests]
