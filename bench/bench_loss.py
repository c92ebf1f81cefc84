"""What computing the head only on labelled positions saves: one head + loss, forward and backward.

    python bench/bench_loss.py

For each vocabulary (LLaMA-2's 32K, SmolLM2's 49K, Gemma's 256K) and a batch of 4 x 512
positions of which a share carries a label (Alpaca with ``--train_on_inputs False``: about
55%, ``lmtune``'s data report), it times, best of ``--repeats``:

- ``stock``: ``lm_head`` on every position, logits upcast to float32, ``F.cross_entropy``
  (what transformers' causal-LM loss does);
- ``all positions``: lmtune's chunked loss given every position (no selection);
- ``labelled only``: lmtune's chunked loss as it runs, on labelled positions alone.

Frozen head (LoRA): the hidden-state gradient is computed, the weight's is not; in float32
and under bf16 autocast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtune.train.loss import causal_lm_loss_sum, shifted_targets

VOCABULARIES = {"32K (LLaMA-2, hidden 768)": (32000, 768), "49K (SmolLM2, hidden 576)": (49152, 576),
                "256K (Gemma, hidden 768)": (256000, 768)}


def stock(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted_targets(labels).reshape(-1),
                           reduction="sum")


def lmtune_all(hidden, weight, labels):
    everything = labels.clone()
    everything[everything == -100] = 0  # same positions as stock computes
    return causal_lm_loss_sum(hidden, weight, everything)[0]


def lmtune(hidden, weight, labels):
    return causal_lm_loss_sum(hidden, weight, labels)[0]


def best_time(fn, hidden, weight, labels, repeats: int, autocast: bool) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        hidden.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hidden, weight, labels)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supervised", type=float, default=0.55, help="Share of positions with a label.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args(argv)
    print(f"head + loss, forward and backward, batch {args.batch} x {args.seq}, {args.supervised:.0%} of positions "
          f"labelled, frozen head; best of {args.repeats}, ms; {torch.get_num_threads()} threads")
    print("| vocabulary | compute | stock | all positions | labelled only | labelled only vs stock |")
    print("|---|---|---|---|---|---|")
    for name, (vocab, width) in VOCABULARIES.items():
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(args.batch, args.seq, width, generator=generator, requires_grad=True)
        weight = torch.randn(vocab, width, generator=generator) / width**0.5
        labels = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        prompt = int(args.seq * (1 - args.supervised))
        labels[:, :prompt] = -100
        for autocast in (False, True):
            times = [best_time(fn, hidden, weight, labels, args.repeats, autocast) * 1000
                     for fn in (stock, lmtune_all, lmtune)]
            print(f"| {name} | {'bf16 autocast' if autocast else 'fp32'} | {times[0]:.0f} | {times[1]:.0f} "
                  f"| {times[2]:.0f} | {times[0] / times[2]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
