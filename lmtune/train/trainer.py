"""Build the stock transformers Trainer for a run.

One small subclass adds what the stock Trainer lacks: ``eval_ppl`` next to every
``eval_loss`` it logs (the reference monkeypatched ``Trainer.evaluate`` globally for that),
and checkpoints written atomically (``train/checkpointing.py``).
"""

from __future__ import annotations

import math

from datasets import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmtune.train.checkpointing import AtomicCheckpointMixin


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an overflow error for a diverged run."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class PerplexityMixin:
    """Adds ``<prefix>_ppl`` wherever an ``eval_loss`` (or ``<prefix>_loss`` of an eval split) is logged."""

    report_perplexity: bool = True

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.report_perplexity:
            for key in [k for k in logs if k.startswith("eval_") and k.endswith("loss")]:
                logs[key[: -len("loss")] + "ppl"] = perplexity(logs[key])
        super().log(logs, *args, **kwargs)


class LmtuneTrainer(AtomicCheckpointMixin, PerplexityMixin, Trainer):
    """The stock Trainer plus perplexity and atomic checkpoints."""


class LmtuneSeq2SeqTrainer(AtomicCheckpointMixin, PerplexityMixin, Seq2SeqTrainer):
    """The stock Seq2SeqTrainer plus perplexity and atomic checkpoints."""


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    training_args: TrainingArguments,
    *,
    train_dataset: Dataset | None,
    eval_dataset: Dataset | None,
    data_collator,
    callbacks: list[TrainerCallback] | None = None,
    eval_ppl: bool = True,
    seq2seq: bool = False,
) -> Trainer:
    """Assemble the Trainer; nothing is trained here.

    Args:
        model: The model, adapter already applied.
        tokenizer: Saved with every checkpoint.
        training_args: The user's ``TrainingArguments``, unmodified.
        train_dataset: Rendered (and possibly packed) training samples.
        eval_dataset: Rendered validation samples, or None.
        data_collator: Batches samples into tensors.
        callbacks: Extra callbacks (progress, signals, ...).
        eval_ppl: Report ``eval_ppl`` with ``eval_loss``.
        seq2seq: Use ``Seq2SeqTrainer``.

    Returns:
        The Trainer, ready for ``train()`` / ``evaluate()``.
    """
    trainer_cls = LmtuneSeq2SeqTrainer if seq2seq else LmtuneTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.report_perplexity = eval_ppl
    return trainer
