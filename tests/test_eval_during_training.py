"""Evaluation while training: task metrics at every evaluation, the best model kept, early stopping,
resume keeping both, MBPP scored in the HumanEval sandbox, and the flags that cannot work."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.errors import ConfigError
from lmtune.evaluate.in_training import combine
from lmtune.evaluate.mbpp import load_mbpp, mbpp_problem
from lmtune.evaluate.humaneval import check_completion
from lmtune.finetuning import finetune

from conftest import write_jsonl

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang over green hills".split()
# Tiny HumanEval-style problems: a random model never solves them, so pass@1 is 0 at every
# evaluation: a metric that has stopped improving.
PROBLEMS = [
    {"task_id": f"Tiny/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n", "entry_point": f"f{i}",
     "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n", "canonical_solution": f"    return x + {i}\n"}
    for i in range(4)
]


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> Path:
    records = []
    for i in range(12):
        article = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))
        records.append({"id": str(i), "article": article, "highlights": " ".join(article.split()[:6])})
    folder = tmp_path_factory.mktemp("summaries")
    write_jsonl(folder / "validation.jsonl", records[:4])
    return write_jsonl(folder / "train.jsonl", records[4:])


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("problems") / "tiny.jsonl", PROBLEMS)


def run_flags(model: Path, train: Path, out: Path, **extra) -> dict:
    flags = dict(
        model_name_or_path=str(model), train_file=str(train), output_dir=str(out), do_train=True, max_steps=4,
        per_device_train_batch_size=2, learning_rate=1e-2, lora_dropout=0.0, max_seq_length=96, seed=3,
        logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, eval_strategy="steps", eval_steps=1,
        save_strategy="no", per_device_eval_batch_size=2,
    )
    flags.update(extra)
    return flags


def evaluations(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "eval_loss" in entry]


def summarization(summaries: Path, **extra) -> dict:
    return dict(task="summarization", validation_file=str(summaries.with_name("validation.jsonl")),
                max_source_length=64, max_target_length=4, num_beams=1, eval_metric_samples=3, **extra)


def test_rouge_at_every_evaluation_reaches_the_state_and_the_log(tiny_llama_dir, summaries, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lmtune"):
        finetune(**run_flags(tiny_llama_dir, summaries, out, **summarization(summaries), report_to="tensorboard"))
    entries = evaluations(out)
    assert [entry["step"] for entry in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_loss", "eval_ppl"} <= set(entry)
        assert entry["eval_metric_samples"] == 3 and 0 <= entry["eval_rouge1"] <= 100
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval at step")]
    assert len(lines) >= 4 and all("eval_rouge1" in line for line in lines)
    # After training, ROUGE scores the whole validation set (4 records), not the 3 of the subset.
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_rouge_samples"] == 4 and "eval_metric_samples" not in results
    assert (out / "metrics_curve.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for file in out.glob("runs/*/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        if "eval/rouge1" in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars("eval/rouge1")]
    assert steps == [1, 2, 3, 4]


def test_without_a_sample_count_the_first_evaluation_chooses_one_and_says_so(tiny_llama_dir, summaries, tmp_path,
                                                                             caplog):
    out = tmp_path / "run"
    flags = summarization(summaries)
    del flags["eval_metric_samples"]
    with caplog.at_level(logging.INFO, logger="lmtune"):
        finetune(**run_flags(tiny_llama_dir, summaries, out, max_steps=2, **flags))
    chosen = {entry["eval_metric_samples"] for entry in evaluations(out)}
    assert len(chosen) == 1 and 1 <= chosen.pop() <= 4  # one size for every evaluation, at most all 4 records
    assert any("task metrics at each evaluation: eval_rouge1" in r.getMessage() and "under 20%" in r.getMessage()
               for r in caplog.records)


def test_an_evaluation_before_training_takes_a_fixed_count_and_says_why(tiny_llama_dir, summaries, tmp_path, caplog):
    flags = summarization(summaries)
    del flags["eval_metric_samples"]
    with caplog.at_level(logging.INFO, logger="lmtune"):
        finetune(**run_flags(tiny_llama_dir, summaries, tmp_path / "run", max_steps=1, eval_on_start=True, **flags))
    assert [(e["step"], e["eval_metric_samples"]) for e in evaluations(tmp_path / "run")] == [(0, 4), (1, 4)]
    assert any("the first evaluation comes before any training" in r.getMessage() for r in caplog.records)


def code_run(model: Path, train: Path, out: Path, problems: Path, **extra) -> dict:
    flags = dict(task="code-generation", humaneval_file=str(problems), validation_split_percentage=20,
                 humaneval_max_new_tokens=8, eval_metric_samples=2, metric_for_best_model="humaneval_pass@1",
                 load_best_model_at_end=True, save_strategy="steps", save_steps=1, max_steps=6)
    return run_flags(model, train, out, **{**flags, **extra})


def test_early_stopping_ends_a_run_whose_metric_stopped_improving_and_keeps_the_best(
        tiny_llama_dir, alpaca_file, problems_file, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lmtune"):
        finetune(**code_run(tiny_llama_dir, alpaca_file, out, problems_file, early_stopping_patience=2))
    state = json.loads((out / "trainer_state.json").read_text())
    # pass@1 is 0 at step 1 and never better: two evaluations without improvement stop the run at step 3.
    assert [e["eval_humaneval_pass@1"] for e in evaluations(out)] == [0.0, 0.0, 0.0]
    assert state["global_step"] == 3 and state["best_global_step"] == 1 and state["best_metric"] == 0.0
    assert state["best_model_checkpoint"] == str(out / "checkpoint-1")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("early stopping: humaneval_pass@1 did not improve") and "stopped at step 3 of 6" in m
               for m in messages)
    assert any(m.startswith("best model: step 1 (humaneval_pass@1 = 0.0)") for m in messages)
    # The adapter in output_dir is the best one (step 1), not the last one trained (step 3).
    final, best = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(final[k], last[k]) for k in last)
    card = (out / "README.md").read_text()
    assert "These weights are the best checkpoint, step 1 (humaneval_pass@1 = 0)." in card
    assert "![task metrics of the evaluations during training](metrics_curve.png)" in card


def test_a_resumed_run_keeps_the_best_metric_and_the_patience_counter(
        tiny_llama_dir, alpaca_file, problems_file, tmp_path):
    # pass@1 stays 0: the counter is 2 at step 3 and reaches 4 at step 5. A resume that lost the
    # counter would count again from 0 and run to the last step, 6.
    flags = dict(early_stopping_patience=4)
    whole = tmp_path / "whole"
    finetune(**code_run(tiny_llama_dir, alpaca_file, whole, problems_file, **flags))
    # A run killed after step 3 leaves checkpoint-1..3 (complete, atomically written) and its args,
    # its paths naming its own output_dir.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
        shutil.copytree(whole / name, resumed / name)
        state_file = resumed / name / "trainer_state.json"
        state_file.write_text(state_file.read_text().replace(str(whole), str(resumed)))
    shutil.copy(whole / "lmtune_args.json", resumed / "lmtune_args.json")
    finetune(**code_run(tiny_llama_dir, alpaca_file, resumed, problems_file, **flags))
    saved = json.loads((whole / "checkpoint-3" / "trainer_state.json").read_text())
    want, got = (json.loads((run / "trainer_state.json").read_text()) for run in (whole, resumed))
    counter = saved["stateful_callbacks"]["ResumableEarlyStopping"]["attributes"]["early_stopping_patience_counter"]
    assert counter > 0  # the resumed part starts with a non-trivial counter
    assert want["global_step"] == 5
    for key in ("global_step", "best_metric", "best_global_step"):
        assert got[key] == want[key], key
    assert got["best_model_checkpoint"] == str(resumed / Path(want["best_model_checkpoint"]).name)
    assert got["stateful_callbacks"] == want["stateful_callbacks"]
    assert [e["eval_humaneval_pass@1"] for e in evaluations(resumed)] == [e["eval_humaneval_pass@1"]
                                                                          for e in evaluations(whole)]


def test_flags_that_cannot_work_fail_before_anything_loads(tiny_llama_dir, alpaca_file, tmp_path):
    base = dict(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(tmp_path / "o"),
                do_train=True, validation_split_percentage=10)
    with pytest.raises(ConfigError, match=r"--early_stopping_patience needs evaluations during training(.|\n)*"
                                          r"--early_stopping_patience needs --metric_for_best_model"):
        finetune(**base, early_stopping_patience=2)
    with pytest.raises(ConfigError, match=r"--metric_for_best_model eval_rouge1: this run does not compute it "
                                          r"\(did you mean eval_loss\?\)"):
        finetune(**base, eval_strategy="steps", metric_for_best_model="eval_rouge1")
    with pytest.raises(ConfigError, match=r"--metric_for_best_model humaneval_pass@1: this run does not compute it"):
        finetune(**base, task="code-generation", eval_strategy="steps", metric_for_best_model="humaneval_pass@1")
    with pytest.raises(ConfigError, match=r"--eval_metric_samples must be >= 0 \(got -1\)"):
        finetune(**base, eval_metric_samples=-1)


def test_greater_is_better_is_inferred_for_losses_perplexities_and_scores():
    from lmtune.args import parse_args

    def parsed(*extra: str):
        return parse_args(["--output_dir", "o", "--eval_strategy", "steps", *extra]).training.greater_is_better

    assert parsed("--metric_for_best_model", "eval_ppl") is False
    assert parsed("--metric_for_best_model", "eval_loss") is False
    assert parsed("--metric_for_best_model", "humaneval_pass@1") is True
    assert parsed("--metric_for_best_model", "eval_ppl", "--greater_is_better", "True") is True


def test_means_of_slices_combine_into_the_mean_of_the_whole():
    assert combine([({"a": 1.0}, 1), ({"a": 0.0}, 3), ({}, 0)]) == {"a": 0.25}
    assert combine([({}, 0)]) == {}


def test_mbpp_reference_solutions_pass_in_the_humaneval_sandbox(shared_data):
    for name, count in (("mbpp.jsonl", 500), ("sanitized-mbpp.json", 257)):
        problems = load_mbpp(shared_data / "eval" / name)
        assert len(problems) == count and problems[0]["task_id"] == "MBPP/11"
        for problem in problems[:6]:
            assert check_completion(problem, problem["canonical_solution"]) == (True, "passed"), problem["task_id"]
        wrong = problems[0]["canonical_solution"].replace("return s", "return s[::-1]")
        assert check_completion(problems[0], wrong)[0] is False


def test_mbpp_problem_runs_setup_code_and_every_given_test():
    record = {"task_id": 7, "text": "Count the nodes.", "code": "def count(n):\r\n    return n.size",
              "test_setup_code": "class N:\n    size = 3\nroot = N()",
              "test_list": ["assert count(root) == 3", "assert count(root) != 4"], "challenge_test_list": []}
    problem = mbpp_problem(record)
    assert problem["entry_point"] == "count" and problem["prompt"].startswith('"""\nCount the nodes.\nassert count')
    assert check_completion(problem, "def count(n):\n    return n.size\n") == (True, "passed")
    assert check_completion(problem, "def count(n):\n    return 4\n")[0] is False


def test_lmtune_eval_scores_mbpp_on_a_model_and_its_reference_solutions(tiny_llama_dir, shared_data, tmp_path):
    from lmtune.cli import main

    mbpp = str(shared_data / "eval" / "sanitized-mbpp.json")
    out = tmp_path / "mbpp"
    assert main(["eval", "--task", "mbpp", "--model_name_or_path", str(tiny_llama_dir), "--output_dir", str(out),
                 "--mbpp_file", mbpp, "--max_eval_samples", "2", "--humaneval_max_new_tokens", "6"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["mbpp_problems"] == 2 and results["mbpp_pass@1"] == 0.0  # a random model writes no function
    assert len((out / "mbpp_results.jsonl").read_text().splitlines()) == 2
    harness = tmp_path / "harness"
    assert main(["eval", "--task", "mbpp", "--mbpp_file", mbpp, "--reference_solutions", "--max_eval_samples", "5",
                 "--output_dir", str(harness)]) == 0
    results = json.loads((harness / "eval_results.json").read_text())
    assert results.pop("evaluated")["data"] == {"mbpp_file": str(Path(mbpp).resolve())}
    assert results == {"mbpp_pass@1": 1.0, "mbpp_problems": 5}
    assert main(["eval", "--task", "mbpp", "--output_dir", str(harness), "--model_name_or_path", "m"]) == 2


def test_a_seq2seq_run_gets_rouge_at_every_evaluation_too(summaries, tmp_path):
    from tiny_t5 import save_tiny_t5

    model = save_tiny_t5(tmp_path / "t5")
    out = tmp_path / "run"
    finetune(**run_flags(model, summaries, out, max_steps=2, **summarization(summaries)))
    entries = evaluations(out)
    assert [entry["step"] for entry in entries] == [1, 2]
    assert all("eval_rougeL" in entry and entry["eval_metric_samples"] == 3 for entry in entries)
