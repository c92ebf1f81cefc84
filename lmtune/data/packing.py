"""Stage 4 (with ``--dataset_concatenation``): pack whole samples into ``max_seq_length`` rows.

The reference concatenated everything and cut it into fixed chunks: samples attended to
each other, positions ran on across them, samples were split between rows and the tail
was dropped. Here each row holds whole samples (best-fit decreasing, so no sample is
split and none is dropped) and carries ``position_ids`` that restart at every sample.
transformers turns restarting positions into a block-diagonal causal mask when no
attention mask is passed, so a packed row computes exactly what its samples would alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class PackingStats:
    samples: int
    rows: int
    tokens: int
    max_seq_length: int

    @property
    def efficiency(self) -> float:
        """Share of row slots holding real tokens."""
        return self.tokens / max(self.rows * self.max_seq_length, 1)

    def describe(self) -> str:
        return (
            f"packed {self.samples} samples into {self.rows} rows of {self.max_seq_length} "
            f"({self.efficiency:.1%} of slots used)"
        )


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity (best-fit decreasing).

    Best fit is found by bisecting a sorted list of the free capacities that occur,
    so a 50K-sample set plans in well under a second.

    Raises:
        ValueError: if a sample is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free capacities of open bins
    bins_by_free: dict[int, list[int]] = {}
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than the row length {capacity}")
        at = bisect.bisect_left(free_values, length)
        if at < len(free_values):
            free = free_values[at]
            bin_id = bins_by_free[free].pop()
            if not bins_by_free[free]:
                del bins_by_free[free]
                free_values.pop(at)
        else:
            free = capacity
            bin_id = len(bins)
            bins.append([])
        bins[bin_id].append(index)
        remaining = free - length
        if remaining > 0:
            if remaining not in bins_by_free:
                bins_by_free[remaining] = []
                bisect.insort(free_values, remaining)
            bins_by_free[remaining].append(bin_id)
    # Keep the original order inside a row, and order rows by their first sample for reproducibility.
    bins = [sorted(b) for b in bins]
    bins.sort(key=lambda b: b[0])
    return bins


def pack_examples(
    samples: dict[str, list[list[int]]], max_seq_length: int
) -> tuple[dict[str, list[list[int]]], PackingStats]:
    """Pack rendered samples into rows with per-sample ``position_ids``.

    Args:
        samples: ``{"input_ids": [...], "labels": [...]}``, every sample <= max_seq_length.
        max_seq_length: Row length.

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` rows, unpadded, and packing statistics.
    """
    lengths = [len(ids) for ids in samples["input_ids"]]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in plan_bins(lengths, max_seq_length):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            input_ids += samples["input_ids"][index]
            labels += samples["labels"][index]
            positions += range(lengths[index])
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    stats = PackingStats(len(lengths), len(rows["input_ids"]), sum(lengths), max_seq_length)
    return rows, stats
