"""ROUGE for summarization, with the numbers HF ``evaluate``'s "rouge" reports.

Stage contract: generated summaries and reference summaries (plain strings)
in, ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}`` out, each the mean
F-measure over examples on a 0-100 scale.

What matches the reference (``evaluate.load("rouge").compute(use_stemmer=True)``
after splitting texts into newline-joined sentences, times 100):
- Google's ``rouge_score`` package, Porter stemming, its default tokenizer;
- rougeLsum is summary-level LCS over newline-separated sentences.

What differs, on purpose:
- ``evaluate`` aggregates with ``BootstrapAggregator`` and reports the median
  of 1000 bootstrap-resampled means, which is the mean up to resampling noise
  and changes from run to run. We report the exact mean, so repeated runs agree.
- Sentences are split with NLTK's Punkt algorithm *untrained* plus a short list
  of English abbreviations, because the trained ``punkt`` model is downloaded
  data we cannot rely on (offline machines, no NLTK data dir). It splits like
  ``nltk.sent_tokenize`` on ordinary prose; it may split after a rare
  abbreviation that the trained model knows.
"""

from __future__ import annotations

from functools import cache

from lmtune.errors import DataFormatError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Lower-cased, without the final period, as Punkt stores them. Titles, Latin
# abbreviations and the months/units that most often end in "." mid-sentence
# in news text (CNN/DailyMail, XSum).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e a.m p.m u.s u.k u.n no gov sen rep gen col "
    "lt sgt capt inc ltd co corp dept univ jan feb mar apr jun jul aug sep sept oct nov dec "
    "approx est fig al".split()
)


# nltk and rouge_score are imported on first use: importing them takes about a second,
# which every fine-tuning run would pay at start-up whether or not it scores ROUGE.
@cache
def _sentence_tokenizer():
    """Build the offline Punkt splitter once."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


@cache
def _scorer(use_stemmer: bool):
    """Build the ``rouge_score`` scorer once per stemming choice."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def split_sentences(text: str) -> str:
    """Put each sentence of ``text`` on its own line, as rougeLsum expects.

    This is the HF summarization examples' ``"\\n".join(nltk.sent_tokenize(text.strip()))``
    without the downloaded punkt model (see the module docstring).

    Args:
        text: A summary, possibly several sentences on one line.

    Returns:
        The sentences joined with ``"\\n"``.
    """
    return "\n".join(_sentence_tokenizer().tokenize(text.strip()))


def compute_rouge(
    predictions: list[str], references: list[str], *, use_stemmer: bool = True
) -> dict[str, float]:
    """Score predictions against references with ROUGE-1/2/L/Lsum.

    Args:
        predictions: Generated summaries.
        references: One reference summary per prediction, in the same order.
        use_stemmer: Porter-stem tokens longer than 3 characters (the reference's setting).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}``: mean F-measure x 100.

    Raises:
        DataFormatError: If the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise DataFormatError(
            f"ROUGE needs one reference per prediction (got {len(predictions)} predictions "
            f"and {len(references)} references)"
        )
    if not predictions:
        raise DataFormatError("ROUGE needs at least one prediction/reference pair (got none)")
    scorer = _scorer(use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        # rouge_score's signature is score(target, prediction).
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: 100.0 * total / len(predictions) for rouge_type, total in totals.items()}
