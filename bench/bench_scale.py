"""How lmtune's start-up grows with the data: preparation time, time to first step, peak memory.

    python bench/bench_scale.py

Each run is ``lmtune finetune`` in its own process on the small benchmark model (``llama-small``:
the model load is not what is measured), ``--max_steps 1``, ``--log_level debug`` (which prints
the start-up phases, ``lmtune/train/startup.py``), a fresh datasets cache (no prepared copy
from an earlier run). Data: the first 2k, 20k and all 52k records of
``alpaca/alpaca_data_52k_en_from_open-chinese.json`` as a ``--train_file``, the same as a local
dataset directory read with ``--dataset_name DIR --streaming --max_train_samples 2000``, and
the SlimOrca stand-in (``hub/Open-Orca/SlimOrca``) with and without ``--streaming``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.assets import SHARED_DATA, build_model_dir

ALPACA_52K = SHARED_DATA / "alpaca" / "alpaca_data_52k_en_from_open-chinese.json"
SLIMORCA = SHARED_DATA / "hub" / "Open-Orca" / "SlimOrca"
PHASES = re.compile(r"start-up: (.*); first optimizer step done at ([\d.]+) s")


def write_sources(work: Path, sizes: list[int]) -> dict[int, tuple[Path, Path]]:
    """Per size: a JSON file, and a dataset directory (``data/train.jsonl``) holding the same records."""
    records = [r for r in json.loads(ALPACA_52K.read_text(encoding="utf-8")) if str(r.get("output", "")).strip()]
    out = {}
    for size in sizes:
        chosen = records[:size]
        file = work / f"alpaca_{size}.json"
        file.write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
        directory = work / f"alpaca_{size}_dir" / "data"
        directory.mkdir(parents=True)
        with open(directory / "train.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen)
        out[len(chosen)] = (file, directory.parent)
    return out


def run(name: str, data_flags: list[str], model_dir: Path, work: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    argv = [sys.executable, "-m", "lmtune", "finetune", "--model_name_or_path", str(model_dir), *data_flags,
            "--output_dir", str(run_dir / "out"), "--do_train", "--max_steps", "1", "--max_seq_length", "256",
            "--per_device_train_batch_size", "4", "--dataset_concatenation", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "True", "--no_cuda", "--log_level", "debug"]
    env = dict(os.environ, HF_DATASETS_CACHE=str(run_dir / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    text = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")
    found = PHASES.search(text)
    if os.waitstatus_to_exitcode(status) != 0 or not found:
        raise RuntimeError(f"{name} failed; log {run_dir / 'log.txt'}:\n{text[-2000:]}")
    phases = {name: seconds for name, seconds in (part.rsplit(" ", 2)[:2] for part in found.group(1).split(", "))}
    return {"name": name, "data_s": float(phases["tokenizer and data"]), "first_step_s": float(found.group(2)),
            "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000, 52002],
                        help="Alpaca record counts (none: only the SlimOrca stand-in).")
    parser.add_argument("--stream-samples", type=int, default=2000)
    args = parser.parse_args(argv)
    if not ALPACA_52K.is_file():
        print(f"skipped: {ALPACA_52K} not found (../shared/data beside the project)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="lmtune-scale-"))
    model_dir = build_model_dir("llama-small", Path.home() / ".cache" / "lmtune-bench")
    rows = []
    for size, (file, directory) in write_sources(work, args.sizes).items():
        rows.append(run(f"alpaca {size}, --train_file", ["--train_file", str(file)], model_dir, work))
        rows.append(run(f"alpaca {size}, --dataset_name DIR --streaming --max_train_samples {args.stream_samples}",
                        ["--dataset_name", str(directory), "--streaming",
                         "--max_train_samples", str(args.stream_samples)], model_dir, work))
        print(rows[-2], rows[-1], flush=True)
    if SLIMORCA.is_dir():
        # The stand-in has a record with an empty assistant message, which lmtune rejects by default.
        chat = ["--dataset_name", str(SLIMORCA), "--task", "chat", "--skip_invalid_records"]
        rows.append(run("SlimOrca stand-in, --dataset_name", chat, model_dir, work))
        rows.append(run("SlimOrca stand-in, --dataset_name --streaming", chat + ["--streaming"], model_dir, work))
        print(rows[-2], rows[-1], flush=True)
    print("| data | data preparation s | process start to first step done s | whole process s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['data_s']:.1f} | {r['first_step_s']:.1f} | {r['wall_s']:.1f} "
              f"| {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
