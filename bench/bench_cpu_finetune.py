"""CPU fine-tuning benchmark: the reference's fast path against lmtune, side by side, on this machine.

Every run trains the same model on the same Alpaca records for one epoch, in its own
process, and the variants alternate (A B C A B C ...) so that machine drift hits them alike.
Printed per variant: whole-process wall time (imports and data preparation included),
dataset tokens per second, peak RSS, training loss, and steady-state model FLOP/s as a
share of the bf16 (and float32) matrix-multiply ceiling measured here before and after.
The last line gives the ratios the issue asks for. See ``bench/README.md``.

    python bench/bench_cpu_finetune.py --quick
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

from bench.assets import (
    MODEL_PRESETS,
    MissingDataError,
    build_model_dir,
    require_shared_data,
    write_records,
)
from bench.report import Measurement, format_table, goal_lines, ratios_line, summarize

VARIANTS: dict[str, dict] = {
    "ref-concat": dict(kind="reference", concatenation=True, bf16=True,
                       label="reference fast path: --bf16 --dataset_concatenation"),
    "ref-pad": dict(kind="reference", concatenation=False, bf16=True,
                    label="reference without concatenation: --bf16"),
    "lmtune": dict(kind="lmtune", concatenation=True, bf16=True,
                   label="lmtune, the reference's flags: --bf16 --dataset_concatenation"),
    "ref-concat-fp32": dict(kind="reference", concatenation=True, bf16=False,
                            label="reference fast path in float32 (no --bf16)"),
    "ref-pad-fp32": dict(kind="reference", concatenation=False, bf16=False,
                         label="reference without concatenation in float32"),
    # What lmtune runs on a CPU without bf16 units, where it refuses emulated bf16: the float32 path.
    "lmtune-fp32": dict(kind="lmtune", concatenation=True, bf16=False,
                        label="lmtune, the reference's flags in float32 (no --bf16)"),
    "lmtune-pad": dict(kind="lmtune", concatenation=False, bf16=True,
                       label="lmtune without --dataset_concatenation"),
    "lmtune-ckpt": dict(kind="lmtune", concatenation=True, bf16=True, extra=["--activation_checkpointing", "True"],
                        label="lmtune, the reference's flags plus --activation_checkpointing True (memory)"),
    # Memory allocators from Debian's packages (libjemalloc2, libtcmalloc-minimal4), preloaded.
    "lmtune-jemalloc": dict(kind="lmtune", concatenation=True, bf16=True,
                            env={"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                            label="lmtune, the reference's flags, LD_PRELOAD=libjemalloc.so.2"),
    "lmtune-tcmalloc": dict(kind="lmtune", concatenation=True, bf16=True,
                            env={"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
                            label="lmtune, the reference's flags, LD_PRELOAD=libtcmalloc_minimal.so.4"),
    # Peers a CPU user could pick instead; "auto" precision: bf16 where this CPU's bf16 pays, else float32.
    "trl": dict(kind="trl", packed=False, bf16="auto",
                label="TRL SFTTrainer, its defaults (no packing, gradient checkpointing on)"),
    "trl-packed": dict(kind="trl", packed=True, bf16="auto",
                       label="TRL SFTTrainer, packing=True (BFD, padding-free), gradient checkpointing off"),
    "torchtune": dict(kind="torchtune", packed=False, bf16="auto",
                      label="torchtune 0.6.1 lora_finetune_single_device, its defaults (no packing)"),
    "torchtune-packed": dict(kind="torchtune", packed=True, bf16="auto",
                             label="torchtune 0.6.1 lora_finetune_single_device, packed: True"),
}
DEFAULT_VARIANTS = ("ref-concat", "ref-concat-fp32", "ref-pad-fp32", "lmtune", "lmtune-pad", "trl", "trl-packed",
                    "torchtune")
PEERS = ("trl", "trl-packed", "torchtune", "torchtune-packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=None, help="Alpaca records per epoch (default 64; quick 16).")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="Row / truncation length (default 512; quick 256).")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (default 4).")
    parser.add_argument("--repeats", type=int, default=None, help="Runs per variant, interleaved (default 2; quick 1).")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-134m", help="Model preset.")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS))
    parser.add_argument("--large-vocab", action="store_true",
                        help="Also run the 256K-vocabulary (Gemma-like) memory case after the main table.")
    parser.add_argument("--large-vocab-variants", nargs="+", choices=sorted(VARIANTS),
                        default=["ref-concat", "ref-concat-fp32", "lmtune"], help="Variants of the large-vocabulary case.")
    parser.add_argument("--large-vocab-records", type=int, default=8, help="Records of the large-vocabulary case.")
    parser.add_argument("--omp-wait-policy", choices=["own", "passive"], default="own",
                        help="own: each program keeps its own OpenMP setting (lmtune sleeps idle threads, the "
                             "reference spins them, torch's default); passive: OMP_WAIT_POLICY=PASSIVE for all.")
    parser.add_argument("--quick", action="store_true", help="Defaults of 16 records, max_seq_length 256, 1 repeat.")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lmtune-bench",
                        help="Where the random-weight models are saved once.")
    parser.add_argument("--torchtune-python", default=os.environ.get("LMTUNE_BENCH_TORCHTUNE_PYTHON", sys.executable),
                        help="Interpreter with torchtune==0.6.1 and torchao==0.13.0 (see bench/torchtune_path.py).")
    parser.add_argument("--work-dir", type=Path, default=None, help="Run outputs and logs (default: a temp dir).")
    parser.add_argument("--results-json", type=Path, default=None, help="Also write every measurement here.")
    args = parser.parse_args(argv)
    defaults = (16, 256, 1) if args.quick else (64, 512, 2)  # flags given explicitly win over --quick
    for name, value in zip(("records", "max_seq_length", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def measure_ceiling(seconds: float = 2.0) -> dict[str, float]:
    """Best GFLOP/s of training-shaped matrix multiplies in bf16 and float32, in a fresh process."""
    code = (
        "import json, torch; from lmtune.train.cpu import matmul_gflops\n"
        f"print(json.dumps({{d: matmul_gflops(getattr(torch, d), m=512, k=768, n=2048, seconds={seconds})"
        " for d in ('bfloat16', 'float32')}))"
    )
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # a ceiling: the best this machine does
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torchtune_missing(python: str) -> str | None:
    """Why ``python`` cannot run torchtune's LoRA recipe, or None when it can."""
    probe = "import sys; sys.path.insert(0, 'bench'); from torchtune_path import recipe_class; recipe_class()"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["import failed"])[-1]


def run_once(name: str, spec: dict, work_dir: Path, index: int, omp_wait_policy: str) -> Measurement:
    """One variant in its own process: wall time and peak RSS from the parent, the rest from the child."""
    run_dir = work_dir / f"{index:02d}-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, output_dir=str(run_dir / "out"))
    (run_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    command = [spec.get("python", sys.executable), str(Path(__file__).with_name("worker.py")), str(run_dir / "spec.json"),
               str(run_dir / "result.json")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if omp_wait_policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(spec.get("env", {}))
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed (exit {process.returncode}); log {run_dir / 'log.txt'}:\n{tail}")
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    return Measurement(name=name, wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024, result=result,
                       cpu_s=usage.ru_utime + usage.ru_stime)


def run_table(
    variants: list[str], base: dict, repeats: int, work_dir: Path, tag: str, omp_wait_policy: str
) -> list[Measurement]:
    measurements = []
    for repeat in range(repeats):
        for name in variants:  # interleaved: A B C A B C
            index = len(measurements)
            print(f"[{tag}] run {index + 1}/{repeats * len(variants)}: {name} ...", flush=True)
            measurement = run_once(name, dict(base, **VARIANTS[name]), work_dir / tag, index, omp_wait_policy)
            print(f"[{tag}]   {measurement.brief()}", flush=True)
            measurements.append(measurement)
    return measurements


def resolve_variants(args: argparse.Namespace, bf16_pays: bool, model_config: dict) -> list[str]:
    """The variants to run: peers' "auto" precision settled for this CPU, torchtune dropped (with why) if absent."""
    for spec in VARIANTS.values():
        if spec.get("bf16") == "auto":
            spec["bf16"] = bf16_pays
        if spec["kind"] == "torchtune":
            spec["python"] = args.torchtune_python
    chosen = list(args.variants)
    if any(VARIANTS[name]["kind"] == "torchtune" for name in chosen):
        why = torchtune_missing(args.torchtune_python)
        if why:
            why = (f"{args.torchtune_python} cannot import torchtune's LoRA recipe ({why}); see "
                   "bench/torchtune_path.py for the install")
        elif model_config.get("tie_word_embeddings"):
            why = "torchtune's lora_llama2 builder has an untied head and this model ties it"
        if why:
            print(f"torchtune variants skipped: {why}")
            chosen = [name for name in chosen if VARIANTS[name]["kind"] != "torchtune"]
    return chosen


def environment() -> str:
    import platform

    import peft
    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {model}, {os.cpu_count()} CPUs, load average {load}; python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_shared_data()
    except MissingDataError as err:
        print(err)
        return 0
    from lmtune.train.cpu import check_bf16

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="lmtune-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(environment())
    check = check_bf16()
    print(f"bf16 check: {check.notice(requested=True) or 'bf16 helps here: ' + check._measured()}")
    before = measure_ceiling()
    model_dir = build_model_dir(args.model, args.cache_dir)
    train_file, left_out = write_records(args.records, work_dir)
    print(f"model {args.model} ({model_dir}); {args.records} Alpaca records ({left_out} with empty output left out); "
          f"max_seq_length {args.max_seq_length}, batch {args.batch_size}, {args.repeats} repeat(s); work dir {work_dir}")
    base = dict(model_dir=str(model_dir), train_file=str(train_file), max_seq_length=args.max_seq_length,
                batch_size=args.batch_size)
    variants = resolve_variants(args, check.helps, json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    measurements = run_table(variants, base, args.repeats, work_dir, "main", args.omp_wait_policy)
    large = []
    if args.large_vocab:
        large_dir = build_model_dir("gemma-like-256k", args.cache_dir)
        large_file, _ = write_records(args.large_vocab_records, work_dir)
        large_base = dict(base, model_dir=str(large_dir), train_file=str(large_file))
        large = run_table(args.large_vocab_variants, large_base, 1, work_dir, "256k", args.omp_wait_policy)
    after = measure_ceiling()
    ceiling = {d: max(before[d], after[d]) for d in before}  # the best this (shared) machine did
    print(f"matmul ceiling (GFLOP/s, before / after): bf16 {before['bfloat16']:.1f} / {after['bfloat16']:.1f}, "
          f"fp32 {before['float32']:.1f} / {after['float32']:.1f}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rows = summarize(measurements, config, ceiling)
    print(format_table(rows, VARIANTS))
    if large:
        large_config = json.loads((large_dir / "config.json").read_text(encoding="utf-8"))
        print(f"\n256K vocabulary (Gemma-like, tied head), {args.large_vocab_records} records:")
        print(format_table(summarize(large, large_config, ceiling), VARIANTS))
    if args.results_json:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "ceiling": {"before": before, "after": after},
                   "runs": [m.to_dict() for m in measurements + large]}
        args.results_json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(ratios_line(rows))
    print(goal_lines(rows, bf16_units=check.helps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
