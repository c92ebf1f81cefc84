"""Tests for lmtune.evaluate.rouge: known values computed by hand."""

import pytest

from lmtune.errors import DataFormatError
from lmtune.evaluate.rouge import ROUGE_TYPES, compute_rouge, split_sentences


def test_identical_texts_score_100() -> None:
    text = "The quick brown fox jumps over the lazy dog. It was not amused."
    assert compute_rouge([text], [text]) == dict.fromkeys(ROUGE_TYPES, 100.0)


def test_disjoint_texts_score_0() -> None:
    assert compute_rouge(["alpha beta gamma"], ["delta epsilon zeta"]) == dict.fromkeys(ROUGE_TYPES, 0.0)


def test_hand_computed_rouge1_and_rouge2() -> None:
    # Unigrams: the x2, cat, on, mat overlap = 5 of 6 on each side -> F = 5/6.
    # Bigrams: "the cat", "on the", "the mat" overlap = 3 of 5 -> F = 3/5.
    scores = compute_rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)


def test_stemming_matches_inflections() -> None:
    assert compute_rouge(["cats running"], ["cat runs"])["rouge1"] == 100.0
    assert compute_rouge(["cats running"], ["cat runs"], use_stemmer=False)["rouge1"] == 0.0


def test_rougelsum_uses_sentence_split_but_rougel_does_not() -> None:
    # Swapped sentences: one LCS over the whole text keeps only 2 of 4 tokens,
    # the summary-level LCS matches each sentence fully.
    scores = compute_rouge(["Cats sleep. Dogs bark."], ["Dogs bark. Cats sleep."])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_scores_are_the_mean_over_examples() -> None:
    scores = compute_rouge(["same words here", "alpha"], ["same words here", "omega"])
    assert scores == dict.fromkeys(ROUGE_TYPES, 50.0)


def test_split_sentences_offline_keeps_common_abbreviations() -> None:
    text = "Mr. Smith went to Washington. He arrived on Jan. 5 with Dr. Jones! Did the U.S. team win? Yes."
    assert split_sentences(text).split("\n") == [
        "Mr. Smith went to Washington.",
        "He arrived on Jan. 5 with Dr. Jones!",
        "Did the U.S. team win?",
        "Yes.",
    ]


def test_length_mismatch_raises() -> None:
    with pytest.raises(DataFormatError, match=r"one reference per prediction \(got 2 predictions and 1 references\)"):
        compute_rouge(["a", "b"], ["a"])


def test_empty_input_raises() -> None:
    with pytest.raises(DataFormatError, match="at least one"):
        compute_rouge([], [])
