"""The private Trainer methods lmtune overrides (``PRIVATE_HOOKS``) still exist, take the same
parameters, and still carry the checkpoint save: this fails loudly on a transformers release that
renames or reroutes them, before a user's checkpoints silently stop being atomic."""

from __future__ import annotations

import inspect

import pytest
import transformers
from transformers import Seq2SeqTrainer, Trainer

from lmtune.train.preference import PreferenceTrainer
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


def test_every_lmtune_trainer_saves_through_the_one_set_of_overrides():
    # One body holds the overrides; the seq2seq and preference Trainers reach it through their
    # method order, so a Seq2SeqTrainer release that overrode one of them would cut it off.
    assert set(vars(Seq2SeqTrainer)).isdisjoint(name for name in vars(LmtuneTrainer) if not name.startswith("__"))
    for cls in (LmtuneTrainer, LmtuneSeq2SeqTrainer, PreferenceTrainer):
        for name in (*PRIVATE_HOOKS, "save_model", "evaluation_loop"):
            assert getattr(cls, name) is vars(LmtuneTrainer)[name], (cls.__name__, name)
    assert LmtuneSeq2SeqTrainer.__mro__[1:4] == (Seq2SeqTrainer, LmtuneTrainer, Trainer)


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
