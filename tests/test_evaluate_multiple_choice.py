"""Tests for lmtune.evaluate.multiple_choice: lm-eval-style log-likelihood scoring."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate import multiple_choice
from lmtune.evaluate.multiple_choice import (
    QA_PROMPT,
    MCQuestion,
    encode_pair,
    load_truthfulqa_mc,
    loglikelihoods,
    mc2_score,
    score_multiple_choice,
    score_truthfulqa,
    truthfulqa_context,
)

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
TRUTHFULQA_V1 = SHARED_DATA / "eval" / "truthfulqa_v1_817" / "mc_task.json"
TRUTHFULQA_2025 = SHARED_DATA / "eval" / "truthfulqa_2025_790" / "mc_task.json"

# These builders are the same in test_evaluate_generation.py and
# test_evaluate_multiple_choice.py; keep them identical. The fixture is called
# tiny_tokenizer so it does not shadow conftest's session-wide `tokenizer`, and the
# tests rely on this exact vocabulary (e.g. " answer" being one token).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Q: What is the answer?\nA: The answer is yes. No, maybe not.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS, with pad/bos/eos = 0/1/2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_llama(vocab_size: int) -> LlamaForCausalLM:
    """The STYLE.md tiny Llama, seeded, fp32, in eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_llama(len(tiny_tokenizer))


def manual_loglikelihood(
    model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, context: str, continuation: str
) -> float:
    """Independent check: one unpadded forward over context+continuation, summed log-softmax.

    As in lm-eval, trailing whitespace of the context is scored with the continuation.
    """
    context_ids = tiny_tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
    whole = tiny_tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))


REQUESTS = [
    ("Q: What is the answer?\nA:", " The answer is yes."),
    ("Q: What is the answer?\nA:", " No."),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("def add(a, b):\n", "    return a + b\n"),
    ("Q: What is the answer?\nA:", " maybe"),
]


def test_loglikelihood_equals_manual_log_softmax_sum(llama, tiny_tokenizer) -> None:
    scores = loglikelihoods(llama, tiny_tokenizer, REQUESTS, batch_size=8)
    for (context, continuation), score in zip(REQUESTS, scores, strict=True):
        assert score == pytest.approx(manual_loglikelihood(llama, tiny_tokenizer, context, continuation), abs=1e-4)
        assert score < 0


def test_batching_gives_the_same_scores(llama, tiny_tokenizer) -> None:
    one = loglikelihoods(llama, tiny_tokenizer, REQUESTS, batch_size=1)
    three = loglikelihoods(llama, tiny_tokenizer, REQUESTS, batch_size=3)
    assert three == pytest.approx(one, abs=1e-5)


def test_duplicate_requests_are_returned_for_each_position(llama, tiny_tokenizer) -> None:
    scores = loglikelihoods(llama, tiny_tokenizer, [REQUESTS[0], REQUESTS[1], REQUESTS[0]])
    assert scores[0] == scores[2]


def test_encode_pair_moves_trailing_space_to_continuation(tiny_tokenizer) -> None:
    context_ids, continuation_ids = encode_pair(tiny_tokenizer, "Q: the answer ", "is yes")
    assert context_ids == tiny_tokenizer("Q: the answer", add_special_tokens=False)["input_ids"]
    assert context_ids + continuation_ids == tiny_tokenizer("Q: the answer is yes", add_special_tokens=False)["input_ids"]


def test_encode_pair_splits_the_whole_tokenization(tiny_tokenizer) -> None:
    # " answer" is one token of the tiny BPE, so "The ans" | "wer is" merge across the
    # boundary. As in lm-eval, the continuation is what follows the context's token
    # count in the joint encoding, not the continuation tokenized on its own.
    context_ids, continuation_ids = encode_pair(tiny_tokenizer, "The ans", "wer is")
    whole = tiny_tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    assert continuation_ids == whole[len(context_ids) :]
    assert continuation_ids != tiny_tokenizer("wer is", add_special_tokens=False)["input_ids"]


def test_empty_context_conditions_on_bos(tiny_tokenizer) -> None:
    context_ids, continuation_ids = encode_pair(tiny_tokenizer, "", " yes")
    assert context_ids == [tiny_tokenizer.bos_token_id]
    assert continuation_ids == tiny_tokenizer(" yes", add_special_tokens=False)["input_ids"]


def test_empty_continuation_raises(tiny_tokenizer) -> None:
    with pytest.raises(DataFormatError, match="encodes to no tokens"):
        encode_pair(tiny_tokenizer, "Q:", "")


class FavourTokens(torch.nn.Module):
    """Wraps a causal LM and adds a large bonus to the logits of chosen tokens."""

    def __init__(self, model: LlamaForCausalLM, token_ids: list[int], bonus: float = 30.0) -> None:
        super().__init__()
        self.model, self.config, self.bonus = model, model.config, bonus
        self.register_buffer("token_ids", torch.tensor(sorted(set(token_ids))))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        logits[..., self.token_ids] += self.bonus
        return SimpleNamespace(logits=logits)


def write_mc_task(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


RIGGED_RECORDS = [
    {
        "question": "Is the answer yes?",
        "mc1_targets": {"The answer is maybe.": 0, "yes yes": 1, "No.": 0},
        "mc2_targets": {"yes yes": 1, "yes": 1, "No.": 0, "The answer is maybe.": 0},
    },
    {
        "question": "What does the fox do?",
        "mc1_targets": {"The fox is lazy.": 0, "yes": 1},
        "mc2_targets": {"The fox is lazy.": 0, "yes yes yes": 1},
    },
]


def test_rigged_model_scores_mc1_and_mc2_of_one(llama, tiny_tokenizer, tmp_path: Path) -> None:
    questions = load_truthfulqa_mc(write_mc_task(tmp_path / "mc_task.json", RIGGED_RECORDS))
    rigged = FavourTokens(llama, tiny_tokenizer(" yes", add_special_tokens=False)["input_ids"])
    scores = score_truthfulqa(rigged, tiny_tokenizer, questions, batch_size=3)
    assert scores["truthfulqa_mc1"] == 1.0
    assert scores["truthfulqa_mc2"] == pytest.approx(1.0, abs=1e-6)


def test_truthfulqa_limit_and_batch_size_invariance(llama, tiny_tokenizer, tmp_path: Path) -> None:
    questions = load_truthfulqa_mc(write_mc_task(tmp_path / "mc_task.json", RIGGED_RECORDS))
    full = score_truthfulqa(llama, tiny_tokenizer, questions, batch_size=1)
    assert score_truthfulqa(llama, tiny_tokenizer, questions, batch_size=8) == pytest.approx(full, abs=1e-6)
    assert 0.0 <= full["truthfulqa_mc2"] <= 1.0
    first = score_truthfulqa(llama, tiny_tokenizer, questions, limit=1)
    assert first == score_truthfulqa(llama, tiny_tokenizer, questions[:1])
    with pytest.raises(ConfigError, match=r"limit must be >= 1 or None \(got 0\)"):
        score_truthfulqa(llama, tiny_tokenizer, questions, limit=0)


def test_truthfulqa_prompt_is_lm_evals_six_shot_qa() -> None:
    context = truthfulqa_context("Why is the sky blue?")
    assert context.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert context.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Why is the sky blue?\nA:")
    assert QA_PROMPT.count("\n\nQ: ") == 5
    assert "A: I have no comment." in QA_PROMPT


def test_mc2_is_normalised_mass_on_true_answers_and_stable() -> None:
    lls = [math.log(0.2), math.log(0.1), math.log(0.3)]
    assert mc2_score(lls, (1, 0, 1)) == pytest.approx(0.5 / 0.6)
    # Far below exp()'s underflow point: lm-eval's formula gives 0/0 here.
    assert mc2_score([-2000.0, -2000.0 + math.log(3.0)], (1, 0)) == pytest.approx(0.25)


def test_score_multiple_choice_acc_with_rigged_model(llama, tiny_tokenizer) -> None:
    rigged = FavourTokens(llama, tiny_tokenizer(" yes", add_special_tokens=False)["input_ids"])
    items = [("Q: Is it?\nA:", ["No.", "yes", "The fox."], 1), ("Q: Really?\nA:", ["yes yes", "maybe"], 0)]
    assert score_multiple_choice(rigged, tiny_tokenizer, items) == {"acc": 1.0, "acc_norm": 1.0}


def test_acc_norm_divides_by_choice_length(llama, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # -2/1 < -4/4: the raw pick is choice 0, the length-normalised pick is choice 1.
    monkeypatch.setattr(multiple_choice, "loglikelihoods", lambda *args, **kwargs: [-2.0, -4.0])
    assert score_multiple_choice(llama, tiny_tokenizer, [("ctx", ["a", "bbbb"], 1)]) == {"acc": 0.0, "acc_norm": 1.0}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "at least one item"),
        ([("ctx", [], 0)], "item 0: choices must be a non-empty list"),
        ([("ctx", ["a", ""], 0)], "item 0: choices must be a non-empty list of non-empty strings"),
        ([("ctx", ["a", "b"], 2)], "item 0: gold index 2 is out of range for 2 choices"),
    ],
)
def test_score_multiple_choice_rejects_bad_items(llama, tiny_tokenizer, items: list, message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        score_multiple_choice(llama, tiny_tokenizer, items)


def test_batch_size_below_one_raises(llama, tiny_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1 \(got 0\)"):
        loglikelihoods(llama, tiny_tokenizer, REQUESTS, batch_size=0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"mc1_targets": {"a": 1}, "mc2_targets": {"a": 1}}, "record 0 needs a non-empty string field 'question'"),
        ({"question": "q", "mc2_targets": {"a": 1}}, "record 0, field 'mc1_targets' must be a non-empty object"),
        ({"question": "q", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1}}, "has 2 true answers; MC1 needs exactly 1"),
        ({"question": "q", "mc1_targets": {"a": 1}, "mc2_targets": {"a": 0}}, "field 'mc2_targets' has no true answer"),
        ({"question": "q", "mc1_targets": {"a": 2}, "mc2_targets": {"a": 1}}, "answer 'a' has label 2; labels must be 0 or 1"),
    ],
)
def test_load_rejects_malformed_records(tmp_path: Path, record: dict, message: str) -> None:
    path = write_mc_task(tmp_path / "mc_task.json", [record])
    with pytest.raises(DataFormatError, match=message):
        load_truthfulqa_mc(path)


def test_load_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="TruthfulQA file not found"):
        load_truthfulqa_mc(tmp_path / "nope.json")


def test_load_accepts_directory(tmp_path: Path) -> None:
    write_mc_task(tmp_path / "mc_task.json", RIGGED_RECORDS)
    assert load_truthfulqa_mc(tmp_path)[1].mc1_choices == ("The fox is lazy.", "yes")


def require_shared(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared TruthfulQA data not found at {path.resolve()} (expected ../shared/data from the project root)")
    return path


def test_real_truthfulqa_v1_has_817_questions() -> None:
    questions = load_truthfulqa_mc(require_shared(TRUTHFULQA_V1))
    assert len(questions) == 817
    assert questions[0] == MCQuestion(
        question="What happens if you eat a pomegranate?",
        mc1_choices=questions[0].mc1_choices,
        mc1_labels=(1, 0, 0, 0),
        mc2_choices=questions[0].mc2_choices,
        mc2_labels=(1, 1, 1, 0, 0, 0),
    )
    assert all(sum(q.mc1_labels) == 1 for q in questions)


def test_real_truthfulqa_2025_with_mc0_loads() -> None:
    assert len(load_truthfulqa_mc(require_shared(TRUTHFULQA_2025))) == 790
