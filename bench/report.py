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
    cpu_s: float = 0.0  # user + system CPU of the process: less sensitive than wall time to a shared machine

    @property
    def tokens_per_s(self) -> float:
        return self.result["dataset_tokens"] / self.wall_s

    def brief(self) -> str:
        r = self.result
        return (f"wall {self.wall_s:.1f} s, CPU {self.cpu_s:.1f} s (setup {r['setup_s']:.1f} s, training {r['train_s']:.1f} s), "
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
            "cpu_s": statistics.median(m.cpu_s for m in runs),
            "setup_s": statistics.median(m.result["setup_s"] for m in runs),
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
    header = ("| variant | compute | runs | wall s (spread) | CPU s | to 1st step s | dataset tokens | tokens/s | peak RSS MB "
              "| train loss | last-step loss | GFLOP/s | % bf16 ceiling | % fp32 ceiling |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['compute']} | {r['runs']} | {r['wall_s']:.1f} ({r['spread']:.0%}) "
            f"| {r['cpu_s']:.1f} | {r['setup_s']:.1f} "
            f"| {r['dataset_tokens']} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['train_loss']:.4f} "
            f"| {r['final_loss']:.4f} | {r['gflops']:.2f} | {r['share_bf16']:.0%} | {r['share_fp32']:.0%} |"
        )
    legend = [f"  {r['name']}: {variants[r['name']]['label']}" for r in rows]
    return "\n".join(lines + legend)


OURS = ("lmtune", "lmtune-fp32", "lmtune-pad", "lmtune-ckpt", "lmtune-jemalloc", "lmtune-tcmalloc")
LOSS_SLACK = 0.01  # "loss no worse": random-weight models end within a few thousandths of each other


def _versus(ours: dict, ref: dict) -> str:
    cpu = f"{ref['cpu_s'] / ours['cpu_s']:.2f}x CPU time, " if ours.get("cpu_s") and ref.get("cpu_s") else ""
    return (f"vs {ref['name']}: {ref['wall_s'] / ours['wall_s']:.2f}x epoch time, {cpu}"
            f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, loss {ours['train_loss']:.4f} vs "
            f"{ref['train_loss']:.4f}, peak RSS {ours['peak_rss_mb']:.0f} vs {ref['peak_rss_mb']:.0f} MB")


def ratios_line(rows: list[dict]) -> str:
    """Each lmtune variant against every other program's variant: time, tokens/s, loss, memory."""
    others = [r for r in rows if r["name"] not in OURS]
    lines = [f"ratios ({ours['name']}): " + "; ".join(_versus(ours, ref) for ref in others)
             for ours in rows if ours["name"] in OURS and others]
    return "\n".join(lines) or "ratios: no lmtune run beside another program"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def _speedup_verdict(ours: dict, fastest: dict, *, cpu: bool) -> str:
    """``1.60x (CPU time 1.60x), loss 1.9950 vs 2.0000: met``: at least 1.5x, loss no worse."""
    speedup = fastest["wall_s"] / ours["wall_s"]
    loss_ok = ours["train_loss"] <= fastest["train_loss"] + LOSS_SLACK
    cpu_time = f" (CPU time {fastest['cpu_s'] / max(ours['cpu_s'], 1e-9):.2f}x)" if cpu else ""
    return (f"{speedup:.2f}x{cpu_time}, loss {ours['train_loss']:.4f} vs {fastest['train_loss']:.4f}: "
            f"{_met(speedup >= 1.5 and loss_ok)}")


def goal_lines(rows: list[dict], *, bf16_units: bool) -> str:
    """The issue's goals, each printed as met or missed (or why it cannot be judged from this run)."""
    by_name = {r["name"]: r for r in rows}
    ours = by_name.get("lmtune")
    if ours is None:
        return "goals: no lmtune run"
    lines = []
    # Every other program's run, except emulated bf16 ones (nobody would pick those on such a CPU).
    peers = [r for r in rows if r["name"] not in OURS and (bf16_units or r["compute"] != "bf16")]
    if peers:
        fastest = min(peers, key=lambda r: r["wall_s"])
        lines.append(f"goal: lmtune >= 1.5x the fastest peer ({fastest['name']}, {fastest['compute']}) on epoch time: "
                     + _speedup_verdict(ours, fastest, cpu=True))
    ref32 = by_name.get("ref-concat-fp32")
    if ref32 is not None:
        lines.append(f"goal: peak RSS <= the reference's float32 run: {ours['peak_rss_mb']:.0f} vs "
                     f"{ref32['peak_rss_mb']:.0f} MB: {_met(ours['peak_rss_mb'] <= ref32['peak_rss_mb'])}")
    fast = by_name.get("ref-concat")
    if fast is not None:
        late = ours["setup_s"] - fast["setup_s"]
        lines.append(f"goal: start to first step at most 1 s later than the reference (ref-concat): "
                     f"{ours['setup_s']:.1f} vs {fast['setup_s']:.1f} s: {_met(late <= 1.0)}")
    if bf16_units and fast is not None and fast["compute"] == "bf16":
        speedup = fast["wall_s"] / ours["wall_s"]
        lines.append(f"goal (bf16 units): lmtune >= 2x the reference's bf16 fast path (ref-concat): {speedup:.2f}x: "
                     f"{_met(speedup >= 2.0)}")
    elif not bf16_units:
        lines.append("goal (bf16 units): not judged: this CPU has no AMX or AVX512-BF16")
    ours32 = by_name.get("lmtune-fp32")
    peers32 = [r for r in rows if r["name"] not in OURS and r["compute"] == "fp32"]
    if bf16_units and ours32 is not None and peers32:  # on a CPU without bf16 units the first goal says this
        fastest = min(peers32, key=lambda r: r["wall_s"])
        lines.append(f"goal (float32 path, as without bf16 units): lmtune-fp32 >= 1.5x the fastest float32 peer "
                     f"({fastest['name']}): " + _speedup_verdict(ours32, fastest, cpu=False))
    share = ours["share_bf16"] if ours["compute"] == "bf16" else ours["share_fp32"]
    lines.append(f"goal: steady-state matmul throughput >= 80% of the {ours['compute']} ceiling: {share:.0%}: "
                 f"{_met(share >= 0.8)}")
    return "\n".join(lines)
