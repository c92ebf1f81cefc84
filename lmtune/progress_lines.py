"""Progress of a long loop that is not training: evaluation, generation, scoring.

On a terminal a person watches, a tqdm bar; where there is none, or the terminal reports no
width (CI logs, ``nohup``, some IDE consoles), a log line every tenth of the way or every
``every_seconds``, so that a 2-minute TruthfulQA run never looks hung.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def terminal_has_width() -> bool:
    """True when stderr is a terminal that reports a usable width (a bar can be drawn)."""
    return sys.stderr.isatty() and shutil.get_terminal_size(fallback=(0, 0)).columns > 0


def tracked(items: Iterable[T], total: int, desc: str, *, every_seconds: float = 30.0) -> Iterator[T]:
    """Yield ``items``, showing how far along the loop is (``total`` items, ``desc`` names the work)."""
    if terminal_has_width():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    tenth = max(total // 10, 1)
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if done == total or done % tenth == 0 or now - last >= every_seconds:
            logger.info("%s: %d/%d done (%.0f s)", desc, done, total, now - start)
            last = now
