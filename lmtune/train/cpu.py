"""Does bf16 make training faster on this CPU? Check the flags, then measure.

``--bf16`` on a CPU only pays where the cores have bf16 matrix instructions: AVX512-BF16
(Xeon 3rd gen "Cooper Lake", AMD Zen 4) or AMX-BF16 (Xeon 4th gen "Sapphire Rapids" and
later). Elsewhere PyTorch emulates bf16 matrix multiplies, and they can run tens of times
slower than float32 (measured on an AVX2-only AMD EPYC: about 30x slower in training); with
AVX512-BF16 (an AMD EPYC Genoa) they ran 2-3x faster than float32 (bench/README.md).
The flags alone do not settle it (a VM may hide them, a build may lack the kernels), so
``check_bf16`` also times a few training-shaped matrix multiplies in both precisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

# x86 names in /proc/cpuinfo "flags"; aarch64 lists "bf16" under "Features".
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 must be at least this much faster than float32 to be worth its rounding.
MIN_SPEEDUP = 1.0


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def bf16_units(flags: set[str]) -> tuple[str, ...]:
    """Which bf16 matrix instruction sets the flags name, best first."""
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def matmul_gflops(dtype: torch.dtype, m: int = 256, k: int = 512, n: int = 512, seconds: float = 0.1) -> float:
    """GFLOP/s of one training step's three matrix multiplies of a (m x k) @ (k x n) layer.

    Forward ``x @ w.T``, input gradient ``g @ w`` and weight gradient ``g.T @ x``: the
    gradient products use transposed operands, which is where emulated bf16 is slowest.
    After one warm-up, runs at least once, then repeats until ``seconds`` have passed; returns the best rate.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    g = torch.randn(m, n, generator=generator).to(dtype)
    flops = 3 * 2 * m * k * n
    x @ w.T, g @ w, g.T @ x  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    start = time.perf_counter()
    while True:
        begin = time.perf_counter()
        x @ w.T, g @ w, g.T @ x
        best = min(best, time.perf_counter() - begin)
        if time.perf_counter() - start >= seconds:
            return flops / best / 1e9


@dataclass(frozen=True)
class Bf16Check:
    """What the CPU offers for bf16 and, when measured, how fast it is against float32."""

    units: tuple[str, ...]
    bf16_gflops: float | None = None
    fp32_gflops: float | None = None

    @property
    def speedup(self) -> float | None:
        """bf16 rate over float32 rate, or None when not measured."""
        if self.bf16_gflops is None or not self.fp32_gflops:
            return None
        return self.bf16_gflops / self.fp32_gflops

    @property
    def helps(self) -> bool:
        """True when bf16 is (measured, or else expected from the flags) at least as fast as float32."""
        if self.speedup is None:
            return bool(self.units)
        return self.speedup >= MIN_SPEEDUP

    def _measured(self) -> str:
        if self.speedup is None:
            return "not measured"
        return (
            f"measured bf16 matrix multiplies at {self.bf16_gflops:.1f} GFLOP/s against "
            f"{self.fp32_gflops:.1f} GFLOP/s in float32 ({self.speedup:.2f}x)"
        )

    def notice(self, requested: bool) -> str | None:
        """What to tell a user who did (``requested``) or did not pass ``--bf16``; None if nothing."""
        found = f"this CPU has {', '.join(self.units)}" if self.units else (
            "this CPU has no bf16 matrix instructions (no amx_bf16 or avx512_bf16 in /proc/cpuinfo)"
        )
        if requested and not self.helps:
            return (
                f"--bf16 would not help here: {found}, and {self._measured()}. Computing in float32 instead, "
                "which is faster on this CPU and at least as accurate; frozen weights stay in bf16, activations "
                "take twice the memory (add --activation_checkpointing True if memory is short). bf16 pays "
                "on CPUs with AMX (Xeon 4th gen and later) or AVX512-BF16."
            )
        if not requested and self.helps and self.speedup is not None and self.speedup >= 1.5:
            return f"{found} and {self._measured()}: pass --bf16 True to train faster."
        return None


def check_bf16(cpuinfo: str | None = None, *, measure: bool = True, seconds: float = 0.1) -> Bf16Check:
    """Inspect the CPU flags and, with ``measure``, time bf16 against float32 matrix multiplies.

    Args:
        cpuinfo: A /proc/cpuinfo text; read from this machine when None.
        measure: Time the multiplies (about a second at most); without it only the flags decide.
        seconds: Time budget per precision.

    Returns:
        The flags found and, when measured, both rates.
    """
    units = bf16_units(cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo))
    if not measure:
        return Bf16Check(units)
    fp32 = matmul_gflops(torch.float32, seconds=seconds)
    bf16 = matmul_gflops(torch.bfloat16, seconds=seconds)
    return Bf16Check(units, bf16_gflops=bf16, fp32_gflops=fp32)


# Debian/Ubuntu (libjemalloc2) and Fedora/RHEL (jemalloc) install paths.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)


def allocator_preload(env: dict[str, str], candidates: tuple[str, ...] = JEMALLOC_PATHS) -> str | None:
    """The ``LD_PRELOAD`` that gives launched ranks jemalloc when ``LMTUNE_ALLOCATOR=jemalloc``, else None.

    A trade, so the user's choice: with jemalloc preloaded the benchmark's peak RSS fell by 29%
    and its epoch took 22% longer (512 Alpaca records at 512 tokens, idle AVX512 machine;
    bench/README.md). It must be preloaded before the process starts, so only ``lmtune
    launch``, which starts the ranks, can set it. Left alone when ``LD_PRELOAD`` already names
    jemalloc or tcmalloc, or when no jemalloc is installed.
    """
    current = env.get("LD_PRELOAD", "")
    if env.get("LMTUNE_ALLOCATOR", "").lower() != "jemalloc" or "jemalloc" in current or "tcmalloc" in current:
        return None
    found = next((path for path in candidates if Path(path).is_file()), None)
    if found is None:
        return None
    return f"{found}:{current}" if current else found
