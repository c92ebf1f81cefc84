"""``lmtune compare``: the report's values are the runs' own JSON files; the picture is drawn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.errors import ConfigError
from lmtune.export.compare import compare_runs, render_report, write_report
from lmtune.finetuning import finetune

pytestmark = pytest.mark.slow  # three real runs (~40 s together)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_llama_dir, demo_records) -> list[Path]:
    """Three short runs that differ in rank, learning rate and steps; one evaluates during training."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "train.json"
    data.write_text(json.dumps(demo_records[:24]), encoding="utf-8")
    common = dict(model_name_or_path=str(tiny_llama_dir), train_file=str(data), do_train=True, do_eval=True,
                  validation_split_percentage=20, per_device_train_batch_size=4, max_seq_length=256,
                  logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no")
    settings = [dict(lora_rank=4, learning_rate=1e-2, max_steps=3),
                dict(lora_rank=8, learning_rate=3e-2, max_steps=4, eval_strategy="steps", eval_steps=2),
                dict(lora_rank=2, learning_rate=1e-3, max_steps=2)]
    runs = []
    for index, extra in enumerate(settings):
        out = root / f"run{index}"
        finetune(**common, **extra, output_dir=str(out))
        runs.append(out)
    return runs


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def test_the_table_holds_the_runs_own_values(three_runs):
    summaries = compare_runs(three_runs)
    for run, summary in zip(three_runs, summaries):
        args, state, results = read(run, "lmtune_args.json")["args"], read(run, "trainer_state.json"), \
            read(run, "all_results.json")
        assert summary.settings["rank"] == args["finetune"]["lora_rank"]
        assert summary.settings["lr"] == args["training"]["learning_rate"]
        assert summary.settings["steps"] == state["global_step"]
        assert summary.settings["wall time (s)"] == results["train_runtime"]
        assert summary.settings["tokens/s"] == pytest.approx(state["num_input_tokens_seen"] / results["train_runtime"])
        assert summary.final["train_loss"] == results["train_loss"] and summary.final["eval_loss"] == results["eval_loss"]
        evals = [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]
        if evals:  # only the run that evaluated during training has a best
            low = min(loss for _, loss in evals)
            assert summary.best["eval_loss"] == (low, next(step for step, loss in evals if loss == low))
        else:
            assert summary.best == {}
    assert [bool(summary.best) for summary in summaries] == [False, True, False]
    report = render_report(summaries)
    rows = [line for line in report.splitlines() if line.startswith("| run |")]
    assert len(rows) == 2  # settings + final metrics, then the best during training
    for run, summary in zip(three_runs, summaries):
        line = next(line for line in report.splitlines() if line.startswith(f"| {run.name} |"))
        assert f"| {read(run, 'all_results.json')['train_loss']:.4g} |" in line
        assert f"| {summary.settings['lr']:.4g} |" in line


def test_the_command_writes_the_report_and_the_picture(three_runs, tmp_path, capsys):
    output = tmp_path / "report.md"
    assert main(["compare", *map(str, three_runs), "--output", str(output)]) == 0
    assert output.read_text().startswith("# lmtune compare") and "![loss and metric curves](report.png)" in \
        output.read_text()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert main(["compare", *map(str, three_runs), "--output", str(output)]) == 0  # its own report: replaced
    assert main(["compare", str(three_runs[0])]) == 0 and "| run0 |" in capsys.readouterr().out


def test_what_is_not_a_run_or_not_a_report_is_refused(three_runs, tmp_path):
    with pytest.raises(ConfigError, match=r"no lmtune_args.json; lmtune compare reads finished lmtune runs"):
        compare_runs([tmp_path])
    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n")
    with pytest.raises(ConfigError, match="exists and is not an lmtune compare report"):
        write_report(three_runs, mine)
    assert mine.read_text() == "my notes\n"
    broken = tmp_path / "broken"
    shutil.copytree(three_runs[0], broken)
    (broken / "all_results.json").write_text("{")
    with pytest.raises(ConfigError, match="all_results.json: not valid JSON"):
        compare_runs([broken])


def test_issue_17_done_means_early_stopping_beside_a_full_run(tiny_llama_dir, alpaca_file, tmp_path, capsys):
    # The issue's acceptance run through the real command line: HumanEval pass@1 at every step,
    # best adapter kept, stopped after 2 evaluations without improvement; compare shows it
    # beside the same run without early stopping.
    problems = tmp_path / "tiny_humaneval.jsonl"
    problems.write_text("".join(json.dumps({
        "task_id": f"Tiny/{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}",
        "test": f"def check(candidate):\n    assert candidate(1) == {i}\n"}) + "\n" for i in range(3)))
    runs = {name: tmp_path / name for name in ("early", "full")}
    for name, out in runs.items():
        extra = ["--early_stopping_patience", "2"] if name == "early" else []
        assert main(["finetune", "--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file),
                     "--validation_split_percentage", "20", "--task", "code-generation", "--humaneval_file",
                     str(problems), "--humaneval_max_new_tokens", "8", "--eval_metric_samples", "3",
                     "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1", "--max_steps", "5",
                     "--metric_for_best_model", "humaneval_pass@1", "--load_best_model_at_end", "True",
                     "--per_device_train_batch_size", "2", "--max_seq_length", "128", "--report_to", "none",
                     "--disable_tqdm", "True", "--use_cpu", "True", "--do_train", "--output_dir", str(out),
                     *extra]) == 0
    assert read(runs["early"], "trainer_state.json")["global_step"] == 3
    assert read(runs["full"], "trainer_state.json")["global_step"] == 5
    assert main(["compare", str(runs["early"]), str(runs["full"]), "--output", str(tmp_path / "r.md")]) == 0
    report = (tmp_path / "r.md").read_text()
    assert "| early |" in report and "| 3/5 |" in report.split("| early |")[1].splitlines()[0]
    assert "eval_humaneval_pass@1" in report and (tmp_path / "r.png").is_file()
