"""Bounded loopback load on `lmtune serve`: N concurrent streaming chat clients, side by side with 1 client.

Starts `python -m lmtune serve` on 127.0.0.1 (a free port), then for each client count runs
streaming `/v1/chat/completions` requests until `--requests` have completed or `--duration`
seconds have passed, whichever comes first, and prints one table: requests/s, time to first
token and total latency (p50/p95), generated tokens/s, errors (must be 0), and the throughput
ratio against one client. The server is stopped with SIGINT at the end and must exit 0.

    python bench/bench_serve.py                                   # lmtune's small demo model
    python bench/bench_serve.py --model_name_or_path ./base --adapter chat=./out --clients 1 4 8

Nothing leaves the machine: the server binds 127.0.0.1 and every client connects there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Give three tips for staying healthy.", "What is LoRA, in two sentences?",
           "Write a haiku about the sea.", "Explain what a tokenizer does."]


@dataclass
class Results:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lmtune", "serve", "--model_name_or_path", args.model_name_or_path,
               "--host", "127.0.0.1", "--port", "0", "--max_queue", str(max(args.clients) * 2),
               "--max_new_tokens", str(args.max_tokens), "--max_tokens_limit", str(args.max_tokens)]
    for adapter in args.adapter:
        command += ["--adapter", adapter]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("LMTUNE_API_KEY", None)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = server.stdout.readline()
    if "chat page " not in line:
        server.kill()
        sys.exit(f"bench_serve: the server did not start: {line!r}")
    return server, line.split("chat page ")[1].split()[0]


def one_request(http: httpx.Client, url: str, body: dict, results: Results) -> None:
    start = time.perf_counter()
    first = None
    usage = None
    try:
        with http.stream("POST", url + "v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}: {response.read()[:200]!r}")
            for line in response.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except Exception as err:  # counted, reported, and the run goes on
        with results.lock:
            results.errors.append(str(err))
        return
    with results.lock:
        results.latency.append(time.perf_counter() - start)
        results.ttft.append(first if first is not None else results.latency[-1])
        results.tokens += usage["completion_tokens"] if usage else 0


def run_load(url: str, model: str | None, clients: int, args: argparse.Namespace) -> tuple[Results, float]:
    results = Results()
    issued = iter(range(args.requests))
    issued_lock = threading.Lock()
    deadline = time.perf_counter() + args.duration

    def client(index: int) -> None:
        with httpx.Client(timeout=args.duration + 60) as http:
            while time.perf_counter() < deadline:
                with issued_lock:
                    number = next(issued, None)
                if number is None:
                    return
                body = {"messages": [{"role": "user", "content": PROMPTS[number % len(PROMPTS)]}], "stream": True,
                        "max_tokens": args.max_tokens, "temperature": 0.7, "seed": number,
                        **({"model": model} if model else {})}
                one_request(http, url, body, results)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", help="base model (default: lmtune's demo model, built once)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR, as lmtune serve takes it")
    parser.add_argument("--model", help="the served name requests ask for (default: the server's default)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients per run")
    parser.add_argument("--requests", type=int, default=24, help="requests per run (fixed count)")
    parser.add_argument("--duration", type=float, default=120.0, help="most seconds per run")
    parser.add_argument("--max_tokens", type=int, default=32, help="max_tokens of every request")
    args = parser.parse_args()
    if not args.model_name_or_path:
        from lmtune.demo import build_demo_model, default_demo_dir

        args.model_name_or_path = str(build_demo_model(default_demo_dir()))
    server, url = start_server(args)
    rows = []
    try:
        one_request(httpx.Client(timeout=120), url, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4, "stream": True}, Results())  # warm-up
        for clients in args.clients:
            results, wall = run_load(url, args.model, clients, args)
            rows.append((clients, results, wall))
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    print(f"lmtune serve on {args.model_name_or_path} ({', '.join(args.adapter) or 'no adapter'}), "
          f"{args.requests} streaming requests per run (or {args.duration:.0f} s), max_tokens {args.max_tokens}, "
          f"loopback; server exit code {code}")
    header = ("clients", "done", "errors", "req/s", "TTFT p50", "TTFT p95", "latency p50", "latency p95",
              "tokens/s", "tokens/s vs 1 client")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    base = None
    for clients, r, wall in rows:
        tokens_s = r.tokens / wall
        base = base or (tokens_s if clients == rows[0][0] else None)
        print(f"| {clients} | {len(r.latency)} | {len(r.errors)} | {len(r.latency) / wall:.2f} | "
              f"{percentile(r.ttft, 50) * 1000:.0f} ms | {percentile(r.ttft, 95) * 1000:.0f} ms | "
              f"{percentile(r.latency, 50):.2f} s | {percentile(r.latency, 95):.2f} s | {tokens_s:.1f} | "
              f"{tokens_s / base:.2f}x |")
    errors = [e for _, r, _ in rows for e in r.errors]
    for error in errors[:5]:
        print(f"error: {error}")
    return 1 if errors or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
