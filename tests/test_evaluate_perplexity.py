"""Tests for lmtune.evaluate.perplexity."""

import math

import pytest

from lmtune.errors import LmtuneError
from lmtune.evaluate.perplexity import add_perplexity, perplexity_from_loss


@pytest.mark.parametrize(("loss", "expected"), [(0.0, 1.0), (math.log(10.0), 10.0), (2.5, math.exp(2.5))])
def test_perplexity_is_exp_of_loss(loss: float, expected: float) -> None:
    assert perplexity_from_loss(loss) == pytest.approx(expected)


@pytest.mark.parametrize("loss", [710.0, 1e6, math.inf])
def test_huge_loss_gives_inf_instead_of_overflow(loss: float) -> None:
    assert perplexity_from_loss(loss) == math.inf


def test_nan_loss_raises_with_causes() -> None:
    with pytest.raises(LmtuneError, match=r"eval loss is NaN.*every label .* is -100"):
        perplexity_from_loss(math.nan)


def test_add_perplexity_returns_new_dict_and_keeps_input() -> None:
    metrics = {"eval_loss": math.log(4.0), "eval_runtime": 1.5}
    result = add_perplexity(metrics)
    assert result["eval_ppl"] == pytest.approx(4.0)
    assert result["eval_runtime"] == 1.5
    assert "eval_ppl" not in metrics


def test_add_perplexity_custom_and_empty_prefix() -> None:
    assert add_perplexity({"test_loss": 0.0}, prefix="test")["test_ppl"] == 1.0
    assert add_perplexity({"loss": 0.0}, prefix="")["ppl"] == 1.0


def test_add_perplexity_missing_loss_names_keys() -> None:
    with pytest.raises(LmtuneError, match=r"no 'eval_loss' \(keys: \['eval_runtime'\]\)"):
        add_perplexity({"eval_runtime": 1.0})


def test_add_perplexity_nan_loss_raises() -> None:
    with pytest.raises(LmtuneError, match="NaN"):
        add_perplexity({"eval_loss": math.nan})
