"""Perplexity from a mean token-level cross-entropy loss.

Stage contract: takes the metrics dict that ``Trainer.evaluate()`` returns and
adds ``<prefix>_ppl`` next to ``<prefix>_loss``. The loss is the mean over
supervised tokens only (labels of -100 are ignored), so with the default
``train_on_inputs=False`` this is response-only perplexity, as in the reference.

Unlike the reference, which swaps in a copy of transformers 4.34's private
``Trainer.evaluate`` to do this, we post-process the public metrics dict, so it
works with any transformers version.
"""

import math

from lmtune.errors import LmtuneError


def perplexity_from_loss(loss: float) -> float:
    """Turn a mean cross-entropy loss (in nats) into perplexity.

    Args:
        loss: Mean negative log-likelihood per token, natural log.

    Returns:
        ``exp(loss)``, or ``inf`` when that overflows a float.

    Raises:
        LmtuneError: If ``loss`` is NaN.
    """
    if math.isnan(loss):
        raise LmtuneError(
            "eval loss is NaN, so perplexity is undefined. Common causes: every label in the "
            "evaluation set is -100 (prompts longer than --max_seq_length leave no response "
            "tokens), fp16 overflow (try --bf16 or fp32), or a diverged run (lower "
            "--learning_rate)."
        )
    try:
        return math.exp(loss)
    except OverflowError:
        # exp() of anything above ~709.78 does not fit a double; the model is
        # effectively uniform-or-worse, and inf says so without crashing the run.
        return math.inf


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """Return a copy of ``metrics`` with ``<prefix>_ppl`` computed from ``<prefix>_loss``.

    Args:
        metrics: Metrics as returned by ``Trainer.evaluate()``; not modified.
        prefix: Metric key prefix (``Trainer.evaluate``'s ``metric_key_prefix``).
            An empty prefix reads ``loss`` and writes ``ppl``.

    Returns:
        A new dict holding every item of ``metrics`` plus the perplexity.

    Raises:
        LmtuneError: If ``<prefix>_loss`` is missing or NaN.
    """
    loss_key = f"{prefix}_loss" if prefix else "loss"
    ppl_key = f"{prefix}_ppl" if prefix else "ppl"
    if loss_key not in metrics:
        raise LmtuneError(
            f"cannot compute perplexity: metrics have no {loss_key!r} (keys: {sorted(metrics)}). "
            "Evaluate with labels in the eval dataset, or pass the prefix that was given to "
            "Trainer.evaluate(metric_key_prefix=...)."
        )
    return {**metrics, ppl_key: perplexity_from_loss(float(metrics[loss_key]))}
