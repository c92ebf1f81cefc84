"""Long non-training loops show progress: a bar on a terminal, log lines where there is none or it has no width."""

from __future__ import annotations

import logging
import os
import shutil
import sys

from lmtune import progress_lines
from lmtune.progress_lines import terminal_has_width, tracked


class FakeTerminal:
    def isatty(self) -> bool:
        return True


def test_zero_width_terminal_falls_back_to_log_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    assert not terminal_has_width()
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((80, 24)))
    assert terminal_has_width()


def test_log_lines_every_tenth_and_at_the_end(monkeypatch, caplog):
    monkeypatch.setattr(progress_lines, "terminal_has_width", lambda: False)
    with caplog.at_level(logging.INFO, logger="lmtune"):
        assert list(tracked(iter(range(25)), 25, "scoring answers")) == list(range(25))
    lines = [r.getMessage() for r in caplog.records if r.name == "lmtune.progress_lines"]
    assert [line.split(" done")[0] for line in lines] == [f"scoring answers: {n}/25" for n in (*range(2, 25, 2), 25)]


def test_a_slow_loop_logs_by_time(monkeypatch, caplog):
    monkeypatch.setattr(progress_lines, "terminal_has_width", lambda: False)
    clock = iter([0.0, 40.0, 41.0, 90.0])
    monkeypatch.setattr(progress_lines.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="lmtune"):
        list(tracked(range(3), 1000, "generating"))
    assert [r.getMessage() for r in caplog.records if r.name == "lmtune.progress_lines"] == [
        "generating: 1/1000 done (40 s)", "generating: 3/1000 done (90 s)"]
