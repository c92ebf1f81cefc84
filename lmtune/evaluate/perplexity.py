"""Perplexity from a mean token-level cross-entropy loss.

Stage contract: ``perplexity_from_loss`` turns an ``eval_loss`` into ``eval_ppl``. The loss is the mean over
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

