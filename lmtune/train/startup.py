"""Where the time before the first optimizer step goes: one line per phase at ``--log_level debug``.

A short run spends much of its time before training (imports, data, model load); the
phases are timed from the process's own start (``/proc/self/stat`` on Linux, else when this
module was imported), so the interpreter and the imports count too.
"""

from __future__ import annotations

import logging
import os
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)
_IMPORTED = time.time()


def process_start_time(stat_path: str = "/proc/self/stat") -> float:
    """Epoch seconds when this process started; when this module loaded where /proc is missing."""
    try:
        with open(stat_path, encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 "starttime", counted after the ")" that ends the command name
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


class StartupPhases:
    """Consecutive phases: each ``mark(name)`` ends the phase that began at the previous mark."""

    def __init__(self, start: float | None = None) -> None:
        self.start = process_start_time() if start is None else start
        self._last = self.start
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.time()
        self.phases.append((name, now - self._last))
        self._last = now

    def summary(self, final: str) -> str:
        """The phases, their sum and ``final`` (e.g. the first step) since the process started."""
        parts = [f"{name} {seconds:.2f} s" for name, seconds in self.phases]
        return f"start-up: {', '.join(parts)}; {final} at {time.time() - self.start:.2f} s since process start"


class StartupReport(TrainerCallback):
    """Marks Trainer set-up at train begin, and logs every phase when the first optimizer step is done."""

    def __init__(self, phases: StartupPhases) -> None:
        self.phases = phases
        self._reported = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases.mark("training set-up")

    def on_step_end(self, args, state, control, **kwargs):
        if not self._reported:
            self._reported = True
            self.phases.mark("first step")
            logger.debug(self.phases.summary("first optimizer step done"))
