"""Build the stock transformers Trainer for a run.

One subclass, ``LmtuneTrainer``, with every override in its body, adds what the stock Trainer
lacks (``LmtuneSeq2SeqTrainer`` and the preference Trainer build on it): ``eval_ppl`` next to
every ``eval_loss`` it logs (the reference monkeypatched ``Trainer.evaluate`` globally for
that), the task's metric at every evaluation during training (``train/eval_metrics.py``),
checkpoints written atomically (``train/checkpointing.py``), and (causal LMs) a training loss
that never materializes the batch's full logits (``train/loss.py``). Two stock choices
change: DDP does not search for unused parameters in adapter runs (every adapter parameter is
used each step; set through the public ``ddp_find_unused_parameters`` of a copy of the
arguments), and ``training_args.bin`` is written without the hub token. Private methods are
overridden only where no public hook exists (``PRIVATE_HOOKS``), and checked when a Trainer
is built.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import copyreg
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

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
from transformers.trainer_utils import EvalLoopOutput

from lmtune.evaluate.perplexity import perplexity_from_loss
from lmtune.train.checkpointing import save_checkpoint_atomically
from lmtune.train.eval_metrics import TaskMetricsCallback
from lmtune.train.loss import causal_lm_loss_sum

logger = logging.getLogger(__name__)


def adapter_find_unused_parameters(model: torch.nn.Module) -> bool | None:
    """DDP's ``find_unused_parameters`` for an adapter model, or None to keep transformers' choice.

    transformers turns the flag on for every model that is not a ``PreTrainedModel``, so for
    every ``PeftModel``: DDP then walks the autograd graph after each backward pass looking
    for parameters without a gradient, and warns on the first step that it found none. Every
    adapter lmtune builds (LoRA and its variants, IA3, prefix, prompt and p-tuning,
    LLaMA-Adapter) takes part in every forward pass. Adapters inside mixture-of-experts
    experts are the exception: a step's tokens may all be routed around an expert, which then
    has no gradient, so those models keep the stock choice.

    Args:
        model: The model given to the Trainer.

    Returns:
        False for an adapter model whose trainable parameters all run every step, else None.
    """
    if not isinstance(model, PeftModel):
        return None
    trainable = (name for name, param in model.named_parameters() if param.requires_grad)
    if any(".experts." in name for name in trainable):
        return None
    return False


def secret_fields(args: TrainingArguments) -> list[str]:
    """The credential fields of ``args``: transformers' own rule (its ``to_dict`` masks ``*_token``)."""
    return [field.name for field in dataclasses.fields(args) if field.name.endswith("_token")]


def _reduce_without_secrets(args: TrainingArguments) -> tuple:
    # The (__newobj__, (cls,), state) triple pickle writes for a plain object by default, so the
    # file loads wherever transformers is installed, without lmtune; only the credentials are gone.
    state = dict(vars(args))
    state.update(dict.fromkeys(secret_fields(args)))
    return copyreg.__newobj__, (type(args),), state


@contextlib.contextmanager
def secrets_left_out_of_pickles(args_type: type[TrainingArguments]) -> Iterator[None]:
    """While active, any pickle of an ``args_type`` object (``torch.save(self.args)``) holds no token.

    The stock Trainer pickles its live arguments into ``training_args.bin`` itself; changing
    how they pickle, for the length of a save, keeps ``--hub_token`` off disk without touching
    the live arguments, which a push to the hub still reads. The registration is process-wide
    while it lasts; another thread pickling the same type meanwhile also drops the token,
    the safe direction.
    """
    previous = copyreg.dispatch_table.get(args_type)
    copyreg.dispatch_table[args_type] = _reduce_without_secrets
    try:
        yield
    finally:
        if previous is None:
            copyreg.dispatch_table.pop(args_type, None)
        else:
            copyreg.dispatch_table[args_type] = previous


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


def add_eval_perplexity(logs: dict[str, float]) -> None:
    """Add ``<prefix>_ppl`` beside every ``eval_loss`` (or ``<prefix>_loss`` of an eval split) in ``logs``."""
    for key in [k for k in logs if k.startswith("eval_") and k.endswith("loss")]:
        # A NaN loss is logged as NaN perplexity: one bad evaluation must not end a long run.
        loss = logs[key]
        logs[key[: -len("loss")] + "ppl"] = math.nan if math.isnan(loss) else perplexity_from_loss(loss)


def add_task_metrics(trainer: Trainer, output: EvalLoopOutput, metric_key_prefix: str) -> EvalLoopOutput:
    """The task's metrics of an evaluation during training, added to the loss loop's metrics.

    ``evaluation_loop`` is the public hook between the loss loop and what the Trainer does
    with its metrics (log, best-model choice, ``on_evaluate`` callbacks): added here, they reach all three.
    """
    if trainer.task_metrics is not None and metric_key_prefix == "eval":
        extra = trainer.task_metrics.compute(trainer.model, trainer.processing_class, trainer.args)
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in extra.items()})
    return output


# Private Trainer methods lmtune overrides because no public hook exists: atomic checkpoints must
# change where the stock save writes (``_get_output_dir``) and act around it (``_save_checkpoint``);
# callbacks run only after the files are in place. Checked against transformers 5.25, with the
# parameters below; tests/test_trainer_private_hooks.py fails when a release renames them,
# changes their parameters, or stops routing the save through them.
PRIVATE_HOOKS: dict[str, tuple[str, ...]] = {
    "_get_output_dir": ("self", "trial"),
    "_save_checkpoint": ("self", "model", "trial"),
}


def check_private_hooks(base: type[Trainer]) -> None:
    """Fail at once, not silently later, when this transformers lacks a private method lmtune overrides.

    Raises:
        RuntimeError: naming the method and the installed transformers version.
    """
    import inspect

    import transformers

    for name, parameters in PRIVATE_HOOKS.items():
        method = getattr(base, name, None)
        found = tuple(inspect.signature(method).parameters) if method is not None else None
        if found != parameters:
            raise RuntimeError(
                f"transformers {transformers.__version__}: {base.__name__}.{name}{found or ' is missing'}; lmtune "
                f"overrides it as {name}{parameters} (checked with transformers 5.25) for atomic checkpoints. "
                "Install a transformers version lmtune supports (see pyproject.toml)."
            )


class LmtuneTrainer(Trainer):
    """The stock Trainer for causal LMs, with every lmtune override in this one class.

    Public hooks: ``compute_loss`` (the lean loss of ``train/loss.py``: the output head runs
    only on labelled positions and never holds the whole batch's float32 logits; evaluation and
    models outside ``PLAIN_HEAD_MODEL_TYPES`` keep the stock loss), ``log`` (``eval_ppl``),
    ``evaluation_loop`` (task metrics during training) and ``save_model`` (no hub token in
    ``training_args.bin``). Private ones, see ``PRIVATE_HOOKS``: ``_get_output_dir`` and
    ``_save_checkpoint`` (atomic checkpoints, ``train/checkpointing.py``).
    """

    report_perplexity: bool = True
    task_metrics: TaskMetricsCallback | None = None
    staging_run_dir: str | None = None

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

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.report_perplexity:
            add_eval_perplexity(logs)
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        return add_task_metrics(self, output, metric_key_prefix)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with secrets_left_out_of_pickles(type(self.args)):
            super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial) -> str:
        return self.staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        stock_save, run_dir = super()._save_checkpoint, Path(super()._get_output_dir(trial))
        # The stock save also pushes to the hub from the checkpoint, pickling the arguments again.
        with secrets_left_out_of_pickles(type(self.args)):
            save_checkpoint_atomically(self, run_dir, lambda: stock_save(model, trial))


class LmtuneSeq2SeqTrainer(Seq2SeqTrainer, LmtuneTrainer):
    """``Seq2SeqTrainer`` (generation in evaluation and prediction) with ``LmtuneTrainer``'s overrides.

    ``Seq2SeqTrainer`` overrides none of the methods ``LmtuneTrainer`` does, so each call reaches
    ``LmtuneTrainer`` through the method order and then the stock ``Trainer``; ``compute_loss``
    takes the stock path, since an encoder-decoder has no plain causal head (``_plain_head_parts``).
    """


def with_ddp_choice(args: TrainingArguments, model: torch.nn.Module) -> TrainingArguments:
    """The arguments the Trainer gets: a copy with ``ddp_find_unused_parameters`` set when lmtune
    chooses it for an adapter model (the public field transformers reads), else ``args`` itself."""
    # An explicit --ddp_find_unused_parameters (True or False) is the user's; leave it.
    choice = adapter_find_unused_parameters(model) if args.ddp_find_unused_parameters is None else None
    if choice is None:
        return args
    if args.world_size > 1 and args.process_index == 0:  # said once, not per rank
        logger.info("DDP: find_unused_parameters=%s, as every adapter parameter is used each step; "
                    "pass --ddp_find_unused_parameters True to override.", choice)
    copy = copy_module.copy(args)  # the caller's arguments stay as they were
    copy.ddp_find_unused_parameters = choice
    return copy


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
    task_metrics: TaskMetricsCallback | None = None,
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
        task_metrics: The task's metrics at every evaluation during training.

    Returns:
        The Trainer, ready for ``train()`` / ``evaluate()``.
    """
    check_private_hooks(Trainer)
    trainer_cls = LmtuneSeq2SeqTrainer if seq2seq else LmtuneTrainer
    trainer = trainer_cls(
        model=model,
        args=with_ddp_choice(training_args, model),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), *([task_metrics] if task_metrics else [])],
        compute_metrics=compute_metrics,
    )
    trainer.report_perplexity = eval_ppl
    trainer.task_metrics = task_metrics
    return trainer
