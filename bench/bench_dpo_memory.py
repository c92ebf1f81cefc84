"""Peak memory of preference tuning against SFT: LoRA DPO (and ORPO) vs an SFT run, same model, batch and lengths.

Each variant runs the reference's CPU recipe (``dpo_clm.py``'s flags: batch 2, 2 accumulation
steps, activation checkpointing, LoRA rank 16 on k/q/v, ``--bf16``) for a few steps in its own
process, on the same ``Intel/orca_dpo_pairs`` records; the parent reads each process's peak RSS
(``ru_maxrss``). The SFT run trains on the chosen answers of the same records
(``finetune_clm``), the DPO runs on the pairs (``finetune_dpo``). A DPO batch holds both answers
of each pair, so its activations are twice the SFT batch's; a second model copy for the
reference would add a whole model more. The goal: DPO peak <= 1.3x the SFT peak.

    python bench/bench_dpo_memory.py                      # the 134M LLaMA preset (needs ../shared/data)
    python bench/bench_dpo_memory.py --model-dir ./SmolLM2-135M-Instruct --records 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.assets import MODEL_PRESETS, build_model_dir  # noqa: E402

PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hub" / "Intel" / "orca_dpo_pairs"
RECIPE = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-4",
          "--lora_rank", "16", "--lora_alpha", "16", "--bf16", "--use_cpu", "true", "--gradient_checkpointing", "true",
          "--lora_all_linear", "false", "--lora_target_modules", "k_proj", "q_proj", "v_proj"]
VARIANTS = {
    "sft": ("lmtune.finetune_clm", ["--do_train"], "SFT on the chosen answers (finetune_clm)"),
    "dpo": ("lmtune.finetune_dpo", [], "DPO, reference = the base with the adapter switched off"),
    "dpo-precomputed": ("lmtune.finetune_dpo", ["--precompute_ref_log_probs"],
                        "DPO with --precompute_ref_log_probs"),
    "orpo": ("lmtune.finetune_dpo", ["--orpo"], "ORPO (no reference)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-134m", help="Model preset.")
    parser.add_argument("--model-dir", type=Path, default=None, help="Use this model directory instead of a preset.")
    parser.add_argument("--records", type=int, default=24, help="Pairs read (default 24).")
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps per run (default 4).")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens of prompt + answer (default 512).")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="Prompt tokens (default 256).")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep runs here (default: a temporary dir).")
    return parser.parse_args(argv)


def write_pairs(count: int, work_dir: Path) -> Path:
    """The first ``count`` pairs of the orca_dpo_pairs stand-in, as JSON Lines both commands read."""
    import datasets

    rows = datasets.load_dataset(str(PAIRS), split="train").select(range(count))
    path = work_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_variant(name: str, model: Path, pairs: Path, work_dir: Path, args: argparse.Namespace) -> dict:
    """One run in its own process; wall time and peak RSS from the parent."""
    module, extra, _ = VARIANTS[name]
    lengths = (["--max_seq_length", str(args.max_length)] if name == "sft" else
               ["--max_length", str(args.max_length), "--max_prompt_length", str(args.max_prompt_length),
                "--validation_split_percentage", "0"])
    command = [sys.executable, "-m", module, "--model_name_or_path", str(model), "--train_file", str(pairs),
               "--output_dir", str(work_dir / name), "--overwrite_output_dir", "--max_steps", str(args.steps),
               "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
               *RECIPE, *lengths, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(work_dir / f"{name}.log", "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (work_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed; log {work_dir / f'{name}.log'}:\n{tail}")
    results = json.loads((work_dir / name / "train_results.json").read_text(encoding="utf-8"))
    return {"name": name, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "train_loss": results["train_loss"]}


def format_table(rows: list[dict]) -> str:
    sft = next((row["peak_rss_mb"] for row in rows if row["name"] == "sft"), None)
    lines = ["| variant | peak RSS MB | vs sft | wall s | train loss |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['peak_rss_mb'] / sft:.2f}x" if sft else "-"
        lines.append(f"| {row['name']} | {row['peak_rss_mb']:.0f} | {ratio} | {row['wall_s']:.1f} | "
                     f"{row['train_loss']:.4f} |")
    lines += [f"  {name}: {VARIANTS[name][2]}" for name in (row["name"] for row in rows)]
    if sft:
        worst = max((row for row in rows if row["name"] != "sft"), key=lambda row: row["peak_rss_mb"], default=None)
        if worst is not None:
            ratio = worst["peak_rss_mb"] / sft
            lines.append(f"highest preference peak: {worst['name']} {ratio:.2f}x the SFT peak "
                         f"(goal <= 1.3x: {'met' if ratio <= 1.3 else 'missed'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not PAIRS.is_dir():
        print(f"bench_dpo_memory: {PAIRS} is absent (the orca_dpo_pairs stand-in in ../shared/data)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lmtune-dpo-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        model = args.model_dir or build_model_dir(args.model, Path.home() / ".cache" / "lmtune-bench")
        pairs = write_pairs(args.records, work_dir)
        rows = []
        for name in args.variants:
            rows.append(run_variant(name, model, pairs, work_dir, args))
            print(f"{name}: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['wall_s']:.1f} s", flush=True)
    print(f"model {model}, {args.records} pairs, {args.steps} steps, max_length {args.max_length}, "
          f"max_prompt_length {args.max_prompt_length}, the reference's CPU recipe")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
