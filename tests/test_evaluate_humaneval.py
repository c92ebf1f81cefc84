"""Tests for lmtune.evaluate.humaneval: sandboxed checks, pass@k, end to end."""

import gzip
import json
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate import humaneval
from lmtune.evaluate.humaneval import (
    check_completion,
    check_completions,
    evaluate_humaneval,
    load_humaneval,
    pass_at_k,
    truncate_at_stop,
)

HUMANEVAL = Path(__file__).parents[1] / ".." / "shared" / "data" / "eval" / "HumanEval.jsonl.gz"

ADD = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}
NEG = {
    "task_id": "Toy/1",
    "prompt": "def neg(x):\n",
    "entry_point": "neg",
    "canonical_solution": "    return -x\n",
    "test": "def check(candidate):\n    assert candidate(2) == -2\n",
}


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"shared HumanEval data not found at {HUMANEVAL.resolve()} (expected ../shared/data)")
    return load_humaneval(HUMANEVAL)


def test_real_file_has_164_problems(problems: list[dict]) -> None:
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"task_id", "prompt", "entry_point", "canonical_solution", "test"} <= problems[0].keys()


def test_all_canonical_solutions_pass(problems: list[dict]) -> None:
    outcomes = check_completions([(p, p["canonical_solution"]) for p in problems], workers=4)
    failures = [(p["task_id"], reason) for p, (ok, reason) in zip(problems, outcomes, strict=True) if not ok]
    assert failures == []


def test_wrong_completion_fails_with_the_error() -> None:
    assert check_completion(ADD, "    return a - b\n") == (False, "failed: AssertionError")
    assert check_completion(ADD, "    return (\n")[1].startswith("failed: SyntaxError")
    assert check_completion(ADD, ADD["canonical_solution"]) == (True, "passed")


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    start = time.monotonic()
    assert check_completion(ADD, "    while True:\n        pass\n", timeout=1.0) == (False, "timed out after 1 s")
    assert time.monotonic() - start < 5.0


def test_early_exit_is_not_a_pass() -> None:
    ok, reason = check_completion(ADD, "    import sys\n    sys.exit(0)\n")
    assert not ok and "SystemExit(0)" in reason
    assert check_completion(ADD, "    import os\n    os._exit(0)\n") == (
        False,
        "failed: the program exited before the tests finished",
    )


def test_memory_limit_stops_huge_allocations() -> None:
    ok, reason = check_completion(ADD, "    x = bytearray(4 * 2**30)\n    return a + b\n", memory_limit_mb=256)
    assert not ok and "MemoryError" in reason


def test_code_runs_in_a_temporary_directory_not_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_completion(ADD, "    open('written.txt', 'w').write('x')\n    return a + b\n")
    assert not (tmp_path / "written.txt").exists()


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(10, 3, 1, 0.3), (10, 0, 1, 0.0), (10, 0, 5, 0.0), (10, 8, 3, 1.0), (5, 5, 5, 1.0), (4, 1, 2, 0.5), (1, 1, 1, 1.0)],
)
def test_pass_at_k_known_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, 1, 6), (5, 1, 0), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ConfigError, match=f"got n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("    return a + b\n\ndef helper():\n    pass\n", "    return a + b\n"),
        ("    return 1\n# comment\nclass A: pass", "    return 1"),
        (
            "    x = 1\n    # indented comment stays\n    return x\nif __name__ == '__main__':",
            "    x = 1\n    # indented comment stays\n    return x",
        ),
        ("    return 2\nprint(f(1))\nclass B:", "    return 2"),
        ("    return 3\n", "    return 3\n"),
        ("\ndef other():", ""),
    ],
)
def test_truncate_at_first_stop_sequence(completion: str, expected: str) -> None:
    assert truncate_at_stop(completion) == expected


def test_load_rejects_missing_fields_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(json.dumps(ADD) + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(DataFormatError, match=r"line 2 lacks string field\(s\) \['entry_point', 'test'\]"):
        load_humaneval(path)
    plain = tmp_path / "he.jsonl"
    plain.write_text(json.dumps(ADD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2 is not valid JSON"):
        load_humaneval(plain)
    with pytest.raises(DataFormatError, match="HumanEval file not found"):
        load_humaneval(tmp_path / "missing.jsonl.gz")


def test_pipeline_truncates_checks_and_averages(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sample 0 of each problem passes only after truncation at "\ndef"; sample 1 fails.
    generations = ["    return a + b\ndef broken(:", "    return 0\n", "    return -x\n\nprint(neg(1))", "    return x\n"]
    monkeypatch.setattr(humaneval, "generate_batched", lambda *args, **kwargs: generations)
    metrics = evaluate_humaneval(None, None, [ADD, NEG], n_samples=2, k=(1, 2))
    assert metrics["humaneval_pass@1"] == pytest.approx(0.5)
    assert metrics["humaneval_pass@2"] == pytest.approx(1.0)
    first = metrics["humaneval_per_problem"][0]
    assert first["task_id"] == "Toy/0"
    assert first["completions"] == ["    return a + b", "    return 0\n"]
    assert first["passed"] == [True, False]
    assert first["results"] == ["passed", "failed: AssertionError"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_samples": 0}, r"n_samples must be >= 1 \(got 0\)"),
        ({"n_samples": 1, "k": (1, 10)}, r"every k must be in 1..n_samples=1 \(got k=\(1, 10\)\)"),
        ({"limit": 0}, r"limit must be >= 1 or None \(got 0\)"),
        ({"workers": 0}, r"workers must be >= 1 \(got 0\)"),
        ({"timeout": 0}, r"timeout must be > 0 seconds \(got 0\)"),
    ],
)
def test_evaluate_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate_humaneval(None, None, [ADD], **kwargs)


def test_tiny_model_end_to_end(one_torch_thread: None) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([ADD["prompt"] + ADD["canonical_solution"], NEG["prompt"]], trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    metrics = evaluate_humaneval(model, hf_tokenizer, [ADD, NEG], max_new_tokens=8, n_samples=2, k=(1, 2), timeout=3.0)
    assert set(metrics) == {"humaneval_pass@1", "humaneval_pass@2", "humaneval_per_problem"}
    assert 0.0 <= metrics["humaneval_pass@1"] <= metrics["humaneval_pass@2"] <= 1.0
    assert [p["task_id"] for p in metrics["humaneval_per_problem"]] == ["Toy/0", "Toy/1"]
    assert all(len(p["completions"]) == len(p["passed"]) == 2 for p in metrics["humaneval_per_problem"])
    greedy = evaluate_humaneval(model, hf_tokenizer, [ADD, NEG], max_new_tokens=8, limit=1)
    assert set(greedy) == {"humaneval_pass@1", "humaneval_per_problem"}
    assert len(greedy["humaneval_per_problem"]) == 1



def test_resource_limits_are_set_in_the_child() -> None:
    completion = (
        "    import resource\n"
        "    assert resource.getrlimit(resource.RLIMIT_AS) == (256 * 2**20, 256 * 2**20)\n"
        "    assert resource.getrlimit(resource.RLIMIT_CPU) == (3, 3)\n"
        "    return a + b\n"
    )
    assert check_completion(ADD, completion, timeout=2.0, memory_limit_mb=256) == (True, "passed")
