"""Tests for lmtune.evaluate.perplexity."""

import math

import pytest

from lmtune.errors import LmtuneError
from lmtune.evaluate.perplexity import perplexity_from_loss


@pytest.mark.parametrize(("loss", "expected"), [(0.0, 1.0), (math.log(10.0), 10.0), (2.5, math.exp(2.5))])
def test_perplexity_is_exp_of_loss(loss: float, expected: float) -> None:
    assert perplexity_from_loss(loss) == pytest.approx(expected)


@pytest.mark.parametrize("loss", [710.0, 1e6, math.inf])
def test_huge_loss_gives_inf_instead_of_overflow(loss: float) -> None:
    assert perplexity_from_loss(loss) == math.inf


def test_nan_loss_raises_with_causes() -> None:
    with pytest.raises(LmtuneError, match=r"eval loss is NaN.*every label .* is -100"):
        perplexity_from_loss(math.nan)
