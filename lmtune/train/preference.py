"""Preference tuning as a second objective beside SFT: the stock Trainer with a DPO/ORPO ``compute_loss``.

Why not TRL's ``DPOTrainer`` (1.16): it wants its own ``DPOConfig`` (a ``TrainingArguments``
subclass) and tokenizes the data itself, truncating prompt + answer from the end only (no
``max_prompt_length`` that keeps a prompt's end); ORPO lives apart in ``trl.experimental``
with another config, trainer and data layout; and its memory-saving fused head scores every
position on a CPU. lmtune's data are rendered and checked before any weights load, the run
keeps the unmodified ``TrainingArguments``, and the trainer is lmtune's (atomic checkpoints,
signals, progress): so the loss is written here, in one ``compute_loss``, with the formulas of
TRL's (``train/preference_loss.py``).

The reference model is never a second copy: with a new adapter it is the base model (adapter
disabled); when training an SFT adapter further it is that adapter loaded a second time,
frozen, as ``reference``; with ``--precompute_ref_log_probs`` its log-probabilities are computed
once before training and ride along in the batches.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import torch
from peft import PeftModel
from transformers import Trainer

from lmtune.data.collate import CausalLMCollator
from lmtune.train.preference_loss import (
    Objective,
    dpo_loss,
    orpo_loss,
    sequence_logps_from_hidden,
    sequence_logps_from_logits,
)
from lmtune.train.trainer import LmtuneTrainer, _plain_head_parts, check_private_hooks, with_ddp_choice

REFERENCE_ADAPTER = "reference"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceCollator:
    """Pads a batch of pairs as one batch of sequences: every chosen answer, then every rejected one.

    One forward pass scores both halves (under DDP, one forward per backward, as it requires).
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad = CausalLMCollator(self.pad_token_id, pad_to_multiple_of=self.max_length or 8, max_length=self.max_length)
        rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                for side in ("chosen", "rejected") for f in features]
        batch = pad(rows)
        for column in REF_COLUMNS:
            if column in features[0]:
                batch[column] = torch.tensor([f[column] for f in features], dtype=torch.float32)
        return batch


@contextlib.contextmanager
def _adapter_active(model: PeftModel, name: str) -> Iterator[None]:
    """Run with adapter ``name`` (frozen) in place of the trained one, then switch back."""
    trained = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trained)  # trainable again, ``name`` frozen


def reference_context(model, reference: str) -> Callable[[], contextlib.AbstractContextManager]:
    """How to turn the policy into the reference for one forward pass, without a second copy of it.

    Args:
        model: The policy.
        reference: ``base`` (the adapter switched off), ``adapter`` (the frozen ``reference``
            adapter in place of the trained one) or ``policy`` (the policy as it is: right only
            before training, for precomputed log-probabilities).
    """
    if reference == "adapter":
        return lambda: _adapter_active(model, REFERENCE_ADAPTER)
    if reference == "base" and isinstance(model, PeftModel):
        return model.disable_adapter
    return contextlib.nullcontext


@contextlib.contextmanager
def _trained_adapter_only(model) -> Iterator[None]:
    """Saves hold the trained adapter only: PEFT would also write the frozen reference copy (and
    leaving it out of ``peft_config`` would put its weights into the trained adapter's file)."""
    if not (isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config):
        yield
        return
    # Trainer._save calls model.save_pretrained itself; for the length of the save it names the adapter.
    model.save_pretrained = functools.partial(type(model).save_pretrained, model,
                                              selected_adapters=[model.active_adapter])
    try:
        yield
    finally:
        del model.save_pretrained


class PreferenceTrainer(LmtuneTrainer):
    """lmtune's Trainer with a DPO or ORPO loss over batches of pairs (``PreferenceCollator``).

    The loss of a step is the mean over every pair of the step, on all ranks: each micro-batch
    returns its pairs' summed loss divided by the step's pair count (``_get_num_items_in_batch``),
    so gradient accumulation and DDP train the same as one big batch. Saving and checkpoints are
    ``LmtuneTrainer``'s (no hub token in ``training_args.bin``, atomic checkpoints); no ``eval_ppl``,
    since the exponential of a preference loss is not a perplexity.
    """

    loss_is_scaled_for_ga = True
    report_perplexity = False
    objective: Objective = Objective()
    reference: Callable[[], contextlib.AbstractContextManager] | None = None

    def _set_signature_columns_if_needed(self) -> None:
        # The stock Trainer drops dataset columns the model's forward does not name; these feed the collator.
        self._signature_columns = [f"{side}_{key}" for side in ("chosen", "rejected") for key in ("input_ids", "labels")]
        self._signature_columns += list(REF_COLUMNS)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        pairs = torch.tensor(sum(batch["input_ids"].shape[0] // 2 for batch in batch_samples), device=device)
        if self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs).sum()
        return pairs

    def sequence_logps(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer log-probabilities of every row, from hidden states where the model allows."""
        features = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        parts = _plain_head_parts(model)
        if parts is None:  # wrapped (DDP), virtual tokens, or a head with extras: the model's own forward
            return sequence_logps_from_logits(model(**features).logits, inputs["labels"])
        decoder, head = parts
        return sequence_logps_from_hidden(decoder(**features).last_hidden_state, head.weight, inputs["labels"])

    def reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if REF_COLUMNS[0] in inputs:
            return torch.cat([inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]])
        if self.reference is None:
            raise RuntimeError("this DPO run has no reference: precompute its log-probabilities")
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self.reference():
            return self.sequence_logps(model, inputs)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, counts = self.sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        if self.objective.orpo:
            losses, metrics = orpo_loss(self.objective, chosen, rejected, chosen_tokens, rejected_tokens)
        else:
            ref_chosen, ref_rejected = self.reference_logps(inputs).to(logps.device).chunk(2)
            losses, metrics = dpo_loss(self.objective, chosen, rejected, ref_chosen, ref_rejected,
                                       chosen_tokens, rejected_tokens)
        self._record(metrics)
        if num_items_in_batch is None:
            loss = losses.mean()
        else:  # the step's pairs over all ranks; DDP then averages the ranks' gradients
            loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        mode = "train" if self.model.training else "eval"
        store = self.__dict__.setdefault("_preference_metrics", {"train": defaultdict(list), "eval": defaultdict(list)})
        for key, values in metrics.items():
            store[mode][key].append(self.accelerator.gather_for_metrics(values.float()).cpu())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        store = self.__dict__.get("_preference_metrics", {}).get(mode, {})
        prefix = "eval_" if mode == "eval" else ""
        for key, values in store.items():  # in place: evaluate() returns the same dict
            logs[prefix + key] = torch.cat(values).mean().item()
        store.clear()
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        with _trained_adapter_only(self.model):
            super()._save(output_dir, state_dict)

    def add_reference_logps(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """``--precompute_ref_log_probs``: the reference's log-probabilities of every pair, as two columns.

        Runs before ``train()`` (and before a resumed run loads its checkpoint), when the policy
        still is what the reference must be where no reference context exists (full fine-tuning,
        or an SFT adapter trained further).
        """
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        size = self.args.per_device_eval_batch_size
        found: list[torch.Tensor] = []
        try:
            for start in range(0, len(dataset), size):
                batch = self.data_collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
                batch = {key: value.to(self.args.device) for key, value in batch.items()}
                with torch.no_grad(), (self.reference or contextlib.nullcontext)(), self.autocast_smart_context_manager():
                    found.append(self.sequence_logps(model, batch)[0].cpu())
        finally:
            model.train(was_training)
        chosen = torch.cat([pair.chunk(2)[0] for pair in found]).tolist()
        rejected = torch.cat([pair.chunk(2)[1] for pair in found]).tolist()
        return dataset.add_column(REF_COLUMNS[0], chosen).add_column(REF_COLUMNS[1], rejected)


def build_preference_trainer(
    model, tokenizer, training_args, *, objective: Objective, train_dataset, eval_dataset, data_collator,
    callbacks=None, reference: str = "base",
) -> PreferenceTrainer:
    """Assemble the preference Trainer (nothing trained here); ``training_args`` are the user's, unmodified.

    ``reference``: see ``reference_context``; unused by ORPO.
    """
    check_private_hooks(Trainer)
    trainer = PreferenceTrainer(
        model=model, args=with_ddp_choice(training_args, model), train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=tokenizer, callbacks=callbacks,
    )
    trainer.objective = objective
    if not objective.orpo:
        trainer.reference = reference_context(model, reference)
    return trainer
