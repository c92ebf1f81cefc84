"""How long data preparation takes: the 52K Alpaca file, tokenized and masked, per worker count.

Each measurement is its own process with an empty datasets cache (``HF_DATASETS_CACHE`` in a
fresh temporary directory), timing ``prepare_data`` alone (loading the tokenizer is not timed):
reading and checking the records, rendering them, and building the train dataset. ``--baseline
REF`` runs the same measurement on the lmtune of a git commit (extracted with ``git archive``),
so that the table shows this tree against it side by side. Runs alternate between variants so
that drift of a shared machine hits all of them alike; the table keeps each variant's fastest
run. A last row times a second preparation that finds the datasets cache filled (``warm``).

    python bench/bench_prepare.py                               # this tree, 1 and 2 workers
    python bench/bench_prepare.py --baseline d0fffc7 --repeats 3

Needs ``../shared/data`` (the Alpaca file, LLaMA's tokenizer); without it the script says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import (
    _TOKENIZER_CONFIG,
    LLAMA_TOKENIZER,
    PROJECT,
    SHARED_DATA,
    check_tokenizer,
)

ALPACA_52K = SHARED_DATA / "alpaca" / "alpaca_data_52k_en_from_open-chinese.json"

# Runs inside the measured process: PYTHONPATH selects which lmtune is imported.
_WORKER = r"""
import inspect, json, sys, time, logging
logging.disable(logging.WARNING)
import datasets
datasets.disable_progress_bars()
from transformers import AutoTokenizer
from lmtune.data.prepare import RenderSettings, prepare_data
tokenizer_dir, data, workers, max_len, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
kwargs = dict(train_file=data, settings=RenderSettings(max_seq_length=max_len, skip_invalid_records=True))
if "preprocessing_num_workers" in inspect.signature(prepare_data).parameters:
    kwargs["preprocessing_num_workers"] = workers
times = []
for _ in range(repeat):
    start = time.perf_counter()
    prepared = prepare_data(tokenizer, **kwargs)
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times, "rows": len(prepared.train), "tokens": prepared.stats["train"].tokens}))
"""


def tokenizer_dir(work: Path) -> Path:
    """LLaMA-2's SentencePiece tokenizer as transformers loads it (the benchmark model's)."""
    directory = work / "llama-tokenizer"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LLAMA_TOKENIZER, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG), encoding="utf-8")
    check_tokenizer(directory)
    return directory


def extract(ref: str, work: Path) -> Path:
    """The ``lmtune`` package of commit ``ref``, in a directory of its own."""
    target = work / f"tree-{ref}"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", ref, "lmtune"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def measure(tree: Path, tokenizer: Path, data: Path, workers: int, max_len: int, repeat: int, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(dir=work, prefix="hf-datasets-"))
    env = dict(os.environ, PYTHONPATH=str(tree), HF_DATASETS_CACHE=str(cache), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _WORKER, str(tokenizer), str(data), str(workers), str(max_len),
                          str(repeat)], env=env, check=True, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ALPACA_52K)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the fastest is shown")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--baseline", help="git commit whose lmtune to measure beside this tree")
    args = parser.parse_args(argv)
    if not (args.data.is_file() and LLAMA_TOKENIZER.is_file()):
        print(f"benchmark skipped: {args.data} or {LLAMA_TOKENIZER} not found (../shared/data beside the project).")
        return 0
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-prepare-") as tmp:
        work = Path(tmp)
        tokenizer = tokenizer_dir(work)
        trees = {"this tree": PROJECT}
        if args.baseline:
            trees = {f"baseline {args.baseline}": extract(args.baseline, work), **trees}
        variants = [(name, w) for name in trees for w in (args.workers if name == "this tree" else [1])]
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.repeats):
            for name, workers in variants:
                result = measure(trees[name], tokenizer, args.data, workers, args.max_seq_length, 1, work)
                key = (name, workers)
                if key not in best or result["seconds"][0] < best[key]["seconds"][0]:
                    best[key] = result
                print(f"  {name}, {workers} worker(s): {result['seconds'][0]:.1f} s", file=sys.stderr)
        warm = measure(PROJECT, tokenizer, args.data, args.workers[0], args.max_seq_length, 2, work)
    base = best[variants[0]]["seconds"][0]
    print(f"\n{args.data.name}: {best[variants[-1]]['rows']} samples, {best[variants[-1]]['tokens']} tokens, "
          f"max_seq_length {args.max_seq_length}, {os.cpu_count()} CPUs\n")
    print(f"| {'variant':<24} | workers | seconds | vs first row |")
    print(f"|{'-' * 26}|---------|---------|--------------|")
    for (name, workers), result in best.items():
        seconds = result["seconds"][0]
        print(f"| {name:<24} | {workers:>7} | {seconds:>7.1f} | {base / seconds:>11.2f}x |")
    print(f"| {'this tree, warm cache':<24} | {args.workers[0]:>7} | {warm['seconds'][1]:>7.1f} | "
          f"{base / warm['seconds'][1]:>11.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
