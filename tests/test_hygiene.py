"""Repository hygiene: what a clone carries."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import PROJECT_ROOT

MAX_TRACKED_BYTES = 1_000_000


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout (e.g. an unpacked archive): no tracked files to check")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_over_one_megabyte():
    files = tracked_files()
    assert "lmtune/finetuning.py" in files
    big = {name: size for name in files
           if (path := PROJECT_ROOT / name).is_file() and (size := path.stat().st_size) > MAX_TRACKED_BYTES}
    assert big == {}, f"tracked files over 1 MB (keep data the package needs only): {big}"
