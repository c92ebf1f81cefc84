"""``lmtune eval``: every evaluation without training, on a saved model (+ adapter)."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.cli import main
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.errors import ConfigError
from lmtune.evaluate.command import dataset_perplexity, parse_eval_args
from lmtune.finetuning import finetune
from tiny_t5 import save_tiny_t5


def results(directory) -> dict:
    """The metrics of eval_results.json, without its record of what was evaluated."""
    saved = json.loads((directory / "eval_results.json").read_text())
    saved.pop("evaluated")
    return saved


@pytest.mark.slow
def test_reference_solutions_pass_all_164_problems(shared_data, tmp_path, capsys):
    out = tmp_path / "harness"
    code = main(["eval", "--task", "humaneval", "--humaneval_file", str(shared_data / "eval" / "HumanEval.jsonl.gz"),
                 "--reference_solutions", "--output_dir", str(out)])
    assert code == 0
    assert results(out) == {"humaneval_pass@1": 1.0, "humaneval_problems": 164}
    rows = [json.loads(line) for line in (out / "humaneval_results.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(row["passed"] == [True] for row in rows)
    assert "humaneval_pass@1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--output_dir", "o", "--model_name_or_path", "m"], "--task is required"),
    (["--task", "truthfulqa", "--model_name_or_path", "m"], "--output_dir is required"),
    (["--task", "truthfulqa", "--output_dir", "o"], "--model_name_or_path is required"),
    (["--task", "humaneval", "--output_dir", "o", "--reference_solutions"], "--task humaneval needs --humaneval_file"),
    (["--task", "summarization", "--output_dir", "o", "--model_name_or_path", "m"],
     "--task summarization needs records"),
    (["--task", "perplexity", "--output_dir", "o", "--model_name_or_path", "m", "--reference_solutions"],
     "--reference_solutions applies to --task humaneval"),
    (["--task", "truthfulqa", "--output_dir", "o", "--model_name_or_path", "m", "--truthfulqa_file", "nope.json"],
     "--truthfulqa_file nope.json: no such file"),
    (["--task", "truthfulqa", "--output_dir", "o", "--model_name_or_path", "m", "--max_eval_samples", "0"],
     r"--max_eval_samples must be > 0 \(got 0\)"),
    (["--task", "truthfulqa", "--output_dir", "o", "--model_name_or_path", "m", "--humaneval_limt", "3"],
     "unknown flag --humaneval_limt"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_eval_args(argv)


def test_help_and_errors_through_the_command(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--reference_solutions" in capsys.readouterr().out
    assert main(["eval", "--task", "truthfulqa"]) == 2
    assert "lmtune: error: invalid arguments" in capsys.readouterr().err


def test_summarization_and_truthfulqa_on_a_model_with_its_adapter(tiny_llama_dir, alpaca_file, shared_data, tmp_path):
    adapter = tmp_path / "adapter"
    finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(adapter),
             do_train=True, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    base = ["--model_name_or_path", str(tiny_llama_dir), "--adapter", str(adapter), "--max_eval_samples", "2"]
    out = tmp_path / "rouge"
    assert main(["eval", "--task", "summarization", *base, "--output_dir", str(out), "--validation_file",
                 str(shared_data / "files" / "summarization_small.jsonl"), "--num_beams", "1",
                 "--max_target_length", "8"]) == 0
    assert set(results(out)) == {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_rouge_samples"}
    assert results(out)["eval_rouge_samples"] == 2
    assert len((out / "eval_generations.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "tqa"
    assert main(["eval", "--task", "truthfulqa", *base, "--output_dir", str(out), "--truthfulqa_file",
                 str(shared_data / "eval" / "truthfulqa_2025_790" / "mc_task.json")]) == 0
    assert results(out)["truthfulqa_questions"] == 2 and 0 < results(out)["truthfulqa_mc2"] < 1


def test_code_generation_on_a_model(tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "code"
    assert main(["eval", "--task", "code-generation", "--model_name_or_path", str(tiny_llama_dir), "--output_dir",
                 str(out), "--humaneval_file", str(shared_data / "eval" / "HumanEval.jsonl.gz"),
                 "--max_eval_samples", "2", "--humaneval_max_new_tokens", "6"]) == 0
    assert results(out)["humaneval_problems"] == 2 and 0 <= results(out)["humaneval_pass@1"] <= 1


def test_perplexity_is_token_weighted_and_batch_size_free(tiny_llama_dir, tokenizer, alpaca_file, tmp_path):
    data = prepare_data(tokenizer, validation_file=str(alpaca_file), need_train=False, need_validation=True,
                        max_eval_samples=7, settings=RenderSettings(max_seq_length=256))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    one = dataset_perplexity(model, tokenizer, data.validation, batch_size=1)
    three = dataset_perplexity(model, tokenizer, data.validation, batch_size=3)
    assert one["eval_loss"] == pytest.approx(three["eval_loss"], rel=1e-5)
    supervised = sum(sum(label != -100 for label in labels[1:]) for labels in data.validation["labels"])
    assert len(data.validation) == 7 and one["eval_tokens"] == supervised and one["eval_samples"] == 7
    assert one["eval_ppl"] == pytest.approx(math.exp(one["eval_loss"]))
    # The command gives the same number from the file.
    out = tmp_path / "ppl"
    assert main(["eval", "--task", "perplexity", "--model_name_or_path", str(tiny_llama_dir), "--validation_file",
                 str(alpaca_file), "--max_eval_samples", "7", "--max_seq_length", "256", "--output_dir", str(out)]) == 0
    assert results(out)["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)


def test_perplexity_of_a_seq2seq_adapter(tmp_path, alpaca_file):
    t5 = save_tiny_t5(tmp_path / "t5")
    adapter = tmp_path / "adapter"
    finetune(model_name_or_path=str(t5), train_file=str(alpaca_file), output_dir=str(adapter), do_train=True,
             max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    out = tmp_path / "ppl"
    assert main(["eval", "--task", "perplexity", "--model_name_or_path", str(t5), "--adapter", str(adapter),
                 "--validation_file", str(alpaca_file), "--max_eval_samples", "4", "--output_dir", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    data = prepare_data(tokenizer, validation_file=str(alpaca_file), need_train=False, need_validation=True,
                        max_eval_samples=4, seq2seq=True)
    assert results(out)["eval_tokens"] == sum(len(labels) for labels in data.validation["labels"])
    assert results(out)["eval_ppl"] == pytest.approx(math.exp(results(out)["eval_loss"]))
