"""Post-training task evaluations: which run, what they report, and the reference's command lines
writing ROUGE, HumanEval pass@1 and TruthfulQA MC1/MC2 into all_results.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction

from lmtune.cli import main_clm
from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate import lm_eval_bridge, tasks
from lmtune.evaluate.lm_eval_bridge import flatten_results, run_lm_eval
from lmtune.evaluate.multiple_choice import score_multiple_choice, score_truthfulqa
from lmtune.evaluate.rouge import compute_rouge
from lmtune.evaluate.tasks import (
    BENCHMARKS,
    HUMANEVAL,
    ROUGE,
    TaskEvalSettings,
    build_rouge_metrics,
    check_task_evaluation,
    evaluate_benchmarks,
    evaluate_code_generation,
    evaluate_summarization,
    plan_evaluations,
)
from lmtune.evaluate.truthfulqa import load_truthfulqa, load_truthfulqa_csv, split_answers
from lmtune.finetuning import finetune


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("task, do_eval, do_lm_eval, plan", [
    ("summarization", True, False, [ROUGE]),
    ("summarization", False, False, []),
    ("summarization", True, True, [ROUGE, BENCHMARKS]),
    ("code-generation", True, True, [HUMANEVAL]),
    ("code-generation", True, False, []),
    ("completion", True, True, [BENCHMARKS]),
    ("chat", False, True, [BENCHMARKS]),
])
def test_plan_follows_the_reference(task, do_eval, do_lm_eval, plan):
    assert plan_evaluations(TaskEvalSettings(task=task, do_eval=do_eval, do_lm_eval=do_lm_eval)) == plan


def test_unrunnable_evaluations_fail_before_training(monkeypatch):
    with pytest.raises(ConfigError, match="HumanEval needs --humaneval_file HumanEval.jsonl.gz"):
        check_task_evaluation(TaskEvalSettings(task="code-generation", do_lm_eval=True))
    monkeypatch.setattr(tasks, "lm_eval_available", lambda: False)
    settings = TaskEvalSettings(do_lm_eval=True, lm_eval_tasks=("truthfulqa_mc", "hellaswag"))
    with pytest.raises(ConfigError, match=r"--lm_eval_tasks hellaswag: .*pip install lm_eval"):
        check_task_evaluation(settings)
    check_task_evaluation(TaskEvalSettings(do_lm_eval=True, lm_eval_tasks=("truthfulqa_mc",)))  # built in
    monkeypatch.setattr(lm_eval_bridge, "lm_eval_available", lambda: False)
    with pytest.raises(ConfigError, match="the lm_eval package is not installed"):
        run_lm_eval(None, None, ["hellaswag"])


def test_code_generation_without_humaneval_file_is_a_flag_error(tiny_llama_dir, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match="--do_lm_eval with --task code-generation runs HumanEval and needs "
                                          "--humaneval_file"):
        finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(tmp_path),
                 do_train=True, task="code-generation", do_lm_eval=True)


def test_truthfulqa_csv_answer_sets_follow_the_authors_code(shared_data, tmp_path):
    questions = load_truthfulqa_csv(shared_data / "eval" / "truthfulqa_v1_817" / "TruthfulQA.csv")
    assert len(questions) == 817
    first = questions[0]
    assert first.question == "What happens to you if you eat watermelon seeds?"  # the BOM did not reach the header
    assert first.mc1_choices[0] == "The watermelon seeds pass through your digestive system."
    assert first.mc1_labels == (1,) + (0,) * 7 and first.mc1_choices[1] == "You grow watermelons in your stomach."
    assert sum(first.mc2_labels) == 6 and len(first.mc2_labels) == 13
    assert split_answers("Nothing happens; They pass.;  ;Fine") == ["Nothing happens.", "They pass.", "Fine."]
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Best Answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['Correct Answers', 'Incorrect Answers'\]"):
        load_truthfulqa_csv(bad)


def test_truthfulqa_sources_dispatch(shared_data, tmp_path, monkeypatch):
    folder = shared_data / "eval" / "truthfulqa_v1_817"
    from_dir = load_truthfulqa(folder)  # the folder: mc_task.json first
    assert len(from_dir) == 817 and len(from_dir[0].mc1_choices) != len(load_truthfulqa(folder / "TruthfulQA.csv")[0].mc1_choices)
    partial = tmp_path / "t.csv"
    with partial.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Question", "Best Answer", "Correct Answers", "Incorrect Answers"])
        writer.writerow(["Is it wet?", "Yes", "Yes; It is", "No"])
        writer.writerow(["Broken?", "Yes", "Yes", ""])  # no incorrect answer: skipped, as the authors skip it
    assert [q.question for q in load_truthfulqa(partial)] == ["Is it wet?"]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="Pass --truthfulqa_file with a local mc_task.json or TruthfulQA.csv"):
        load_truthfulqa(None, cache_dir=str(tmp_path / "cache"))


def test_benchmarks_report_only_what_was_asked(llama, shared_data):
    model, tokenizer = llama
    path = shared_data / "eval" / "truthfulqa_v1_817" / "mc_task.json"
    both = evaluate_benchmarks(model, tokenizer, ["truthfulqa_mc"], truthfulqa_file=path, limit=2)
    assert set(both) == {"truthfulqa_mc1", "truthfulqa_mc2", "truthfulqa_questions"} and both["truthfulqa_questions"] == 2
    direct = score_truthfulqa(model, tokenizer, load_truthfulqa(path), limit=2)
    assert both["truthfulqa_mc2"] == pytest.approx(direct["truthfulqa_mc2"])
    only = evaluate_benchmarks(model, tokenizer, ["truthfulqa_mc2"], truthfulqa_file=path, limit=2)
    assert "truthfulqa_mc1" not in only and only["truthfulqa_mc2"] == pytest.approx(direct["truthfulqa_mc2"])


def test_flatten_lm_eval_results():
    results = {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
               "gsm8k": {"exact_match,strict-match": 0.125, "sample_len": 3}}
    assert flatten_results(results) == {"arc_acc": 0.5, "arc_acc_norm": 0.25, "gsm8k_exact_match_strict-match": 0.125}


ITEMS = [("Q: What is two plus two?\nA:", ["4", "5", "22"], 0), ("Q: What colour is the sky?\nA:", ["blue", "green"], 0),
         ("The capital of France is", ["Paris", "Rome", "Berlin"], 0), ("Water is", ["wet", "dry"], 0),
         ("Q: Is fire cold?\nA:", ["no", "yes"], 0), ("One, two,", ["three", "four"], 0)]


def test_lm_eval_task_file_runs_on_the_in_memory_model_and_agrees_with_lmtune(llama, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = llama
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": g}) + "\n" for q, c, g in ITEMS))
    task = tmp_path / "local_mc.yaml"
    task.write_text(f"task: lmtune_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                    "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
                    "    higher_is_better: true\n", encoding="utf-8")
    metrics = run_lm_eval(model, tokenizer, [str(task)], batch_size=4)
    ours = score_multiple_choice(model, tokenizer, [(q, c, g) for q, c, g in ITEMS])
    assert set(metrics) == {"lmtune_local_mc_acc"}
    assert metrics["lmtune_local_mc_acc"] == pytest.approx(ours["acc"])
    with pytest.raises(ConfigError, match=r"--lm_eval_tasks .*not_a_task\.yaml: no such task file"):
        run_lm_eval(model, tokenizer, [str(tmp_path / "not_a_task.yaml")], batch_size=4)


def test_summarization_rouge_matches_its_saved_generations(llama, shared_data, tmp_path):
    model, tokenizer = llama
    records = [json.loads(line) for line in (shared_data / "files" / "summarization_small.jsonl").open()][:3]
    metrics = evaluate_summarization(model, tokenizer, records, max_source_length=96, max_target_length=8,
                                     num_beams=2, batch_size=2, output_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "eval_generations.jsonl").read_text().splitlines()]
    assert [row["reference"] for row in rows] == [r["highlights"] for r in records]  # whole highlights
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    expected = compute_rouge([row["prediction"] for row in rows], [row["reference"] for row in rows])
    assert metrics == {**{f"eval_{k}": pytest.approx(v, abs=1e-4) for k, v in expected.items()},
                       "eval_rouge_samples": 3}


def test_rouge_from_generated_ids_ignores_padding(llama):
    _, tokenizer = llama
    texts = ["the cat sat on the mat", "a dog ran"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids)) + 2
    generated = np.array([row + [-100] * (width - len(row)) for row in ids])  # generation padding as gathered
    labels = np.array([ids[0] + [-100] * (width - len(ids[0])), ids[0] + [-100] * (width - len(ids[0]))])
    scores = build_rouge_metrics(tokenizer)(EvalPrediction(predictions=generated, label_ids=labels))
    assert scores["rouge1"] == pytest.approx(50.0) and scores["rougeLsum"] == pytest.approx(50.0)


def test_code_generation_reports_pass_at_k_and_saves_every_completion(llama, shared_data, tmp_path):
    model, tokenizer = llama
    metrics = evaluate_code_generation(model, tokenizer, humaneval_file=shared_data / "eval" / "HumanEval.jsonl.gz",
                                       limit=2, n_samples=2, max_new_tokens=6, output_dir=tmp_path)
    assert set(metrics) == {"humaneval_pass@1", "humaneval_problems", "humaneval_n_samples"}  # no @10 with n=2
    assert metrics["humaneval_problems"] == 2 and 0 <= metrics["humaneval_pass@1"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "humaneval_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(r["completions"]) == len(r["passed"]) == len(r["results"]) == 2 for r in rows)


def run_flags(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--do_train", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "True",
            "--save_strategy", "no", "--no_cuda", *extra]


def test_reference_summarization_command_line_writes_rouge(tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "sum"
    code = main_clm(run_flags(
        tiny_llama_dir, out, "--bf16", "True", "--dataset_name", str(shared_data / "hub" / "cnn_dailymail"),
        "--dataset_config_name", "3.0.0", "--task", "summarization", "--do_eval", "--max_eval_samples", "4",
        "--learning_rate", "1e-4", "--peft", "lora",
    ))
    assert code == 0
    everything = json.loads((out / "all_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum"):
        assert 0 <= everything[key] == evaluation[key] <= 100
    assert everything["eval_rouge_samples"] == 4 and "eval_loss" in everything and "train_loss" in everything
    assert len((out / "eval_generations.jsonl").read_text().splitlines()) == 4


def test_code_generation_with_do_lm_eval_writes_humaneval_pass_at_1(tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "code"
    code = main_clm(run_flags(
        tiny_llama_dir, out, "--dataset_name", str(shared_data / "hub" / "sahil2801" / "CodeAlpaca-20k"),
        "--max_train_samples", "8", "--task", "code-generation", "--do_lm_eval", "true",
        "--humaneval_file", str(shared_data / "eval" / "HumanEval.jsonl.gz"), "--humaneval_limit", "2",
        "--humaneval_max_new_tokens", "8",
    ))
    assert code == 0
    everything = json.loads((out / "all_results.json").read_text())
    assert 0 <= everything["humaneval_pass@1"] <= 1 and everything["humaneval_problems"] == 2
    assert json.loads((out / "lm_eval_results.json").read_text())["humaneval_pass@1"] == everything["humaneval_pass@1"]
    assert len((out / "humaneval_results.jsonl").read_text().splitlines()) == 2
    assert not Path("evaluation_results.json").exists()  # the reference wrote into the working directory


def test_truthfulqa_with_do_lm_eval_writes_mc1_and_mc2(tiny_llama_dir, alpaca_file, shared_data, tmp_path):
    out = tmp_path / "tqa"
    code = main_clm(run_flags(
        tiny_llama_dir, out, "--train_file", str(alpaca_file), "--do_lm_eval", "true", "--lm_eval_tasks",
        "truthfulqa_mc", "--truthfulqa_file", str(shared_data / "eval" / "truthfulqa_v1_817" / "TruthfulQA.csv"),
        "--lm_eval_limit", "2",
    ))
    assert code == 0
    everything = json.loads((out / "all_results.json").read_text())
    assert 0 <= everything["truthfulqa_mc1"] <= 1 and 0 < everything["truthfulqa_mc2"] < 1
    assert everything["truthfulqa_questions"] == 2 and not math.isnan(everything["truthfulqa_mc2"])


def fake_loglikelihoods(requests):
    """Deterministic made-up log-likelihoods, the same for a request whichever scorer asks."""
    return [-(sum(map(ord, context + continuation)) % 97) / 10 - 0.1 for context, continuation in requests]


def test_seq2seq_truthfulqa_aggregates_exactly_as_the_causal_scorer(shared_data, monkeypatch):
    from lmtune.evaluate import multiple_choice, seq2seq_scoring

    questions = load_truthfulqa(shared_data / "eval" / "truthfulqa_v1_817" / "mc_task.json")[:6]
    monkeypatch.setattr(multiple_choice, "loglikelihoods", lambda m, t, requests, **_: fake_loglikelihoods(requests))
    monkeypatch.setattr(seq2seq_scoring, "seq2seq_loglikelihoods",
                        lambda m, t, requests, **_: fake_loglikelihoods(requests))
    causal = multiple_choice.score_truthfulqa(None, None, questions)
    assert seq2seq_scoring.score_truthfulqa_seq2seq(None, None, questions) == causal
    # A hand-made item with known log-likelihoods: MC1 right, MC2 = e^-1 / (e^-1 + e^-2).
    item = [multiple_choice.MCQuestion("Q?", ("yes", "no"), (1, 0), ("yes", "no"), (1, 0))]
    known = {" yes": -1.0, " no": -2.0}
    monkeypatch.setattr(seq2seq_scoring, "seq2seq_loglikelihoods",
                        lambda m, t, requests, **_: [known[cont] for _, cont in requests])
    scores = seq2seq_scoring.score_truthfulqa_seq2seq(None, None, item)
    assert scores == {"truthfulqa_mc1": 1.0, "truthfulqa_mc2": pytest.approx(1 / (1 + math.exp(-1)))}


def test_seq2seq_loglikelihood_is_the_decoder_log_probability(tmp_path, shared_data):
    from transformers import AutoModelForSeq2SeqLM

    from lmtune.evaluate.seq2seq_scoring import encode_seq2seq_pair, seq2seq_loglikelihoods
    from tiny_t5 import EOS_ID, save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "t5")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(t5).eval(), AutoTokenizer.from_pretrained(t5)
    requests = [("Q: What is two plus two?\nA: ", "4"), ("The sky is", " blue today"), ("Water is", " wet")]
    context, continuation = encode_seq2seq_pair(tokenizer, *requests[0])
    assert context[-1] == EOS_ID and continuation == tokenizer(" 4", add_special_tokens=False).input_ids
    loss = model(input_ids=torch.tensor([context]), labels=torch.tensor([continuation])).loss
    one_by_one = seq2seq_loglikelihoods(model, tokenizer, requests, batch_size=1)
    assert one_by_one[0] == pytest.approx(-loss.item() * len(continuation), rel=1e-5)
    assert seq2seq_loglikelihoods(model, tokenizer, requests, batch_size=3) == pytest.approx(one_by_one, rel=1e-5)
    metrics = evaluate_benchmarks(model, tokenizer, ["truthfulqa_mc"], limit=2,
                                  truthfulqa_file=shared_data / "eval" / "truthfulqa_v1_817" / "mc_task.json")
    assert metrics["truthfulqa_questions"] == 2 and 0 < metrics["truthfulqa_mc2"] < 1
