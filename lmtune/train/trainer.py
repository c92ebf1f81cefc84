"""Build the stock transformers Trainer for a run.

One small subclass adds what the stock Trainer lacks: ``eval_ppl`` next to every
``eval_loss`` it logs (the reference monkeypatched ``Trainer.evaluate`` globally for that),
checkpoints written atomically (``train/checkpointing.py``), and a training loss that
never materializes the batch's full logits (``train/loss.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmtune.evaluate.perplexity import perplexity_from_loss
from lmtune.train.checkpointing import AtomicCheckpointMixin
from lmtune.train.loss import causal_lm_loss_sum


class PerplexityMixin:
    """Adds ``<prefix>_ppl`` wherever an ``eval_loss`` (or ``<prefix>_loss`` of an eval split) is logged."""

    report_perplexity: bool = True

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.report_perplexity:
            for key in [k for k in logs if k.startswith("eval_") and k.endswith("loss")]:
                # A NaN loss is logged as NaN perplexity: one bad evaluation must not end a long run.
                loss = logs[key]
                logs[key[: -len("loss")] + "ppl"] = math.nan if math.isnan(loss) else perplexity_from_loss(loss)
        super().log(logs, *args, **kwargs)


# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no logit
# soft-capping (Gemma 2/3), scaling (Cohere, Granite) or auxiliary loss (Mixtral routers).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "phi3"})


def _plain_head_parts(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, lm_head) of an unwrapped causal LM or LoRA-style PEFT model, else None.

    Anything wrapped (DDP, torch.compile) or with virtual tokens (prefix/prompt tuning)
    must go through its own forward, so it gets None and the stock loss.
    """
    if isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            return None
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return model.get_decoder(), head


class LmtuneTrainer(AtomicCheckpointMixin, PerplexityMixin, Trainer):
    """The stock Trainer plus perplexity, atomic checkpoints and a lean training loss.

    The training loss is computed from hidden states (``train/loss.py``): the output head
    runs only on labelled positions and never holds the whole batch's float32 logits.
    Evaluation, and models outside ``PLAIN_HEAD_MODEL_TYPES``, keep the stock path.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = _plain_head_parts(model)
        stock = (
            parts is None or return_outputs or "labels" not in inputs
            or self.label_smoother is not None or self.compute_loss_func is not None
        )
        if stock:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        decoder, head = parts
        features = {key: value for key, value in inputs.items() if key != "labels"}
        hidden = decoder(**features, use_cache=False).last_hidden_state
        loss_sum, count = causal_lm_loss_sum(hidden, head.weight, inputs["labels"])
        # Mirror the stock loss: divide by the whole accumulated batch's label count when the
        # Trainer passes it (then it skips its own 1/accumulation_steps), else by this batch's.
        scaled = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        loss = loss_sum / (num_items_in_batch if scaled else count.clamp(min=1))
        if scaled and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss


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
    compute_metrics: Callable | None = None,
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
        seq2seq: Use ``Seq2SeqTrainer`` (needs ``Seq2SeqTrainingArguments``).
        compute_metrics: Extra metrics from each evaluation's predictions (e.g. ROUGE of
            generated text with ``--predict_with_generate``).

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
        compute_metrics=compute_metrics,
    )
    trainer.report_perplexity = eval_ppl
    return trainer
