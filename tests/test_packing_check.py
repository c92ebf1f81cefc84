"""The packing probe's failure branches: what it refuses, and what it lets through as a bug."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmtune.errors import UnsupportedError
from lmtune.train.packing_check import check_packing_isolation


class BagOfWords(nn.Module):
    """A 'model' whose every position sees the whole row, and whose forward takes no position_ids."""

    def __init__(self, bug: Exception | None = None):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.config = SimpleNamespace(model_type="bag-of-words")
        self.dtype = torch.float32
        self.bug = bug

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, use_cache=False):
        if self.bug is not None:
            raise self.bug
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=hidden + hidden.mean(dim=1, keepdim=True))


def test_a_model_that_takes_no_position_ids_is_refused_with_the_fix():
    with pytest.raises(UnsupportedError, match=r"model type 'bag-of-words' lets packed samples attend to each other: "
                                               r"its attention takes neither restarting position_ids nor a "
                                               r"block-diagonal mask; drop --dataset_concatenation"):
        check_packing_isolation(BagOfWords())


@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s)"), ValueError("bad"), RuntimeError("oops")])
def test_other_errors_are_bugs_not_unsupported_models(bug):
    model = BagOfWords(bug)
    model.train()
    with pytest.raises(type(bug), match=str(bug).split("(")[0]):
        check_packing_isolation(model)
    assert model.training  # the probe puts the model back as it found it
