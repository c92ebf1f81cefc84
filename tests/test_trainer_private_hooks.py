"""The private Trainer methods lmtune overrides (``PRIVATE_HOOKS``) still exist, take the same
parameters, and still carry the checkpoint save: this fails loudly on a transformers release that
renames or reroutes them, before a user's checkpoints silently stop being atomic."""

from __future__ import annotations

import inspect

import pytest
import transformers
from transformers import Seq2SeqTrainer, Trainer

from lmtune.train.trainer import PRIVATE_HOOKS, LmtuneSeq2SeqTrainer, LmtuneTrainer, check_private_hooks


@pytest.mark.parametrize("base", [Trainer, Seq2SeqTrainer], ids=lambda cls: cls.__name__)
def test_every_private_hook_exists_with_its_parameters(base):
    for name, parameters in PRIVATE_HOOKS.items():
        method = getattr(base, name, None)
        assert method is not None, f"transformers {transformers.__version__} has no {base.__name__}.{name}"
        assert tuple(inspect.signature(method).parameters) == parameters, name
    check_private_hooks(base)


def test_the_stock_save_still_asks_for_its_directory_and_saves_through_save_model():
    # Atomic checkpoints redirect _get_output_dir during _save_checkpoint; the token stays out of
    # the pickles because the model (and, pushing to the hub, the arguments) go through save_model
    # and the push inside _save_checkpoint.
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in source
    assert "self.save_model(" in source


def test_each_kind_overrides_them_itself():
    for cls in (LmtuneTrainer, LmtuneSeq2SeqTrainer):
        assert {*PRIVATE_HOOKS, "save_model", "log", "evaluation_loop"} <= set(vars(cls)), cls.__name__
    assert "compute_loss" in vars(LmtuneTrainer) and "compute_loss" not in vars(LmtuneSeq2SeqTrainer)


def test_a_missing_or_changed_hook_is_named():
    class Renamed(Trainer):
        _get_output_dir = None

    class Changed(Trainer):
        def _save_checkpoint(self, model):
            pass

    with pytest.raises(RuntimeError, match=r"Renamed._get_output_dir is missing; lmtune overrides it"):
        check_private_hooks(Renamed)
    with pytest.raises(RuntimeError, match=r"Changed._save_checkpoint\('self', 'model'\); lmtune overrides it as "
                                           r"_save_checkpoint\('self', 'model', 'trial'\)"):
        check_private_hooks(Changed)


def test_the_mixins_kept_for_trainers_built_elsewhere_still_do_their_job(tokenizer, tmp_path):
    # A trainer built outside build_trainer (as the preference trainer is) gets the same two stock
    # changes and atomic checkpoints from the two mixins.
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainingArguments

    from conftest import tiny_llama_config
    from lmtune.data.collate import CausalLMCollator
    from lmtune.model.adapters import AdapterSettings, apply_adapter
    from lmtune.train.checkpointing import COMPLETE_MARKER, AtomicCheckpointMixin
    from lmtune.train.trainer import StockOverridesMixin

    class Elsewhere(StockOverridesMixin, AtomicCheckpointMixin, Trainer):
        pass

    torch.manual_seed(0)
    model = apply_adapter(LlamaForCausalLM(tiny_llama_config(len(tokenizer))), AdapterSettings(peft="lora"))
    rows = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 2]] * 4, "labels": [[-100, 5, 6, 7, 2]] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, save_steps=1,
                             per_device_train_batch_size=2, hub_token="secret123", disable_tqdm=True)
    trainer = Elsewhere(model=model, args=args, train_dataset=rows, data_collator=CausalLMCollator(3))
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False and args.ddp_find_unused_parameters is None
    trainer.train()
    assert (tmp_path / "checkpoint-1" / COMPLETE_MARKER).is_file()
    assert torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False).hub_token is None
