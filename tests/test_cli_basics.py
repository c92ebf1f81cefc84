"""What a user tries first: --version, and --help that states each default once."""

from __future__ import annotations

import re

import pytest

from lmtune import __version__
from lmtune.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lmtune {__version__}\n"


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, whitespace collapsed."""
    entries = re.split(r"\n  (?=-)", text.split("\noptions:", 1)[1])
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


@pytest.mark.parametrize("command", ["finetune", "chat", "eval", "merge"])
def test_help_states_each_default_once(command, capsys):
    assert main([command, "--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    twice = [flag for flag, text in entries.items() if "(default:" in text and text.lower().count("default") > 1]
    assert twice == []
    if command == "finetune":
        assert entries["--lora_target_modules"].endswith(
            "Module names to adapt (default: the model family's attention projections).")
        assert entries["--lora_rank"].endswith("LoRA rank r. (default: 8)")
        assert "--strict_records" in entries
