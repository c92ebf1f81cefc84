"""Turn benchmark runs into the table and the ratios line.

Model FLOPs follow the usual accounting: per token 4 x (matmul parameters) for LoRA (forward
plus the input-gradient half of backward; frozen weights need no weight gradient), 6 x for
full fine-tuning, plus causal attention, 6 x layers x hidden x seq^2 per row (forward 2, backward 4).
Matmul parameters exclude the input embedding (a lookup) and count the output head once.
Every computed position counts (padding too): FLOP/s measures how busy the matrix units
were, tokens/s measures useful work. Steady state leaves out each run's first step.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class Measurement:
    name: str
    wall_s: float
    peak_rss_mb: float
    result: dict

    @property
    def tokens_per_s(self) -> float:
        return self.result["dataset_tokens"] / self.wall_s

    def brief(self) -> str:
        r = self.result
        return (f"wall {self.wall_s:.1f} s (setup {r['setup_s']:.1f} s, training {r['train_s']:.1f} s), "
                f"{self.tokens_per_s:.1f} dataset tokens/s, peak RSS {self.peak_rss_mb:.0f} MB, "
                f"train loss {r['train_loss']:.4f}, {r['steps']} steps, compute {r['compute']}, "
                f"weights {r['weights']}, {r['threads']} threads, OMP_WAIT_POLICY {r['omp_wait_policy']}")

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_params(config: dict) -> int:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_dim = hidden * config.get("num_key_value_heads", heads) // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter
    return layers * per_layer + config["vocab_size"] * hidden


def step_flops(config: dict, batch: int, seq: int, *, lora: bool = True) -> float:
    linear = (4 if lora else 6) * matmul_params(config) * batch * seq
    attention = 6 * config["num_hidden_layers"] * config["hidden_size"] * seq * seq * batch
    return float(linear + attention)


def steady_flops_per_s(result: dict, config: dict) -> float:
    """Model FLOPs over time of every step but the first (all steps if there is only one)."""
    steps = result["steps_timed"]
    ends = [s[0] for s in steps[1:]] + [result["train_end"]]
    timed = [(end - start, b, t) for (start, b, t), end in zip(steps, ends)]
    if len(timed) > 1:
        timed = timed[1:]
    return sum(step_flops(config, b, t) for _, b, t in timed) / sum(d for d, _, _ in timed)


def summarize(measurements: list[Measurement], config: dict, ceiling: dict[str, float]) -> list[dict]:
    """One row per variant: medians over its repeats, plus the spread of its wall times."""
    rows = []
    for name in dict.fromkeys(m.name for m in measurements):
        runs = [m for m in measurements if m.name == name]
        walls = [m.wall_s for m in runs]
        flops = statistics.median(steady_flops_per_s(m.result, config) for m in runs)
        rows.append({
            "name": name, "runs": len(runs), "wall_s": statistics.median(walls),
            "spread": (max(walls) - min(walls)) / statistics.median(walls),
            "tokens_per_s": statistics.median(m.tokens_per_s for m in runs),
            "dataset_tokens": runs[0].result["dataset_tokens"], "rows": runs[0].result["rows"],
            "peak_rss_mb": max(m.peak_rss_mb for m in runs),
            "train_loss": statistics.median(m.result["train_loss"] for m in runs),
            "final_loss": statistics.median(m.result["final_loss"] for m in runs),
            "compute": runs[0].result["compute"], "gflops": flops / 1e9,
            "share_bf16": flops / 1e9 / ceiling["bfloat16"], "share_fp32": flops / 1e9 / ceiling["float32"],
        })
    return rows


def format_table(rows: list[dict], variants: dict[str, dict]) -> str:
    header = ("| variant | compute | runs | wall s (spread) | dataset tokens | tokens/s | peak RSS MB "
              "| train loss | last-step loss | GFLOP/s | % bf16 ceiling | % fp32 ceiling |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['compute']} | {r['runs']} | {r['wall_s']:.1f} ({r['spread']:.0%}) "
            f"| {r['dataset_tokens']} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['train_loss']:.4f} "
            f"| {r['final_loss']:.4f} | {r['gflops']:.2f} | {r['share_bf16']:.0%} | {r['share_fp32']:.0%} |"
        )
    legend = [f"  {r['name']}: {variants[r['name']]['label']}" for r in rows]
    return "\n".join(lines + legend)


def ratios_line(rows: list[dict]) -> str:
    """Each lmtune variant with the reference's flags against each reference variant: time, loss, memory."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for ours_name in ("lmtune", "lmtune-ckpt"):
        ours = by_name.get(ours_name)
        if ours is None:
            continue
        parts = []
        for name, goal in (("ref-concat", 2.0), ("ref-pad", 4.0), ("ref-concat-fp32", None), ("ref-pad-fp32", None)):
            ref = by_name.get(name)
            if ref is None:
                continue
            speedup = ref["wall_s"] / ours["wall_s"]
            goal_text = f" (goal >= {goal:g}: {'met' if speedup >= goal else 'missed'})" if goal else ""
            parts.append(
                f"vs {name}: {speedup:.2f}x epoch time{goal_text}, "
                f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, "
                f"loss {ours['train_loss']:.4f} vs {ref['train_loss']:.4f}, "
                f"peak RSS {ours['peak_rss_mb']:.0f} vs {ref['peak_rss_mb']:.0f} MB"
            )
        lines.append(f"ratios ({ours_name}): " + "; ".join(parts))
    return "\n".join(lines) or "ratios: no lmtune run"
