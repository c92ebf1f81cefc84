"""A broken JSON data file is named before torch, transformers or datasets load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmtune.data.early_check import check_json_files_early
from lmtune.errors import DataFormatError

from conftest import PROJECT_ROOT

PROBE = """
import sys
from lmtune.cli import main
code = main(["finetune", "--model_name_or_path", "m", "--train_file", sys.argv[1], "--output_dir", "o", "--do_train"])
heavy = sorted(name for name in ("torch", "transformers", "datasets") if name in sys.modules)
print(code, heavy)
"""


def test_a_broken_line_is_named_before_any_heavy_import(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n', encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-c", PROBE, str(bad)], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.stdout.strip() == "2 []", result.stderr
    assert f"lmtune: error: {bad}: line 2" in result.stderr


def test_early_check_reads_only_json_files_and_respects_skipping(tmp_path):
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": ["a"], "output": "b"}]))
    with pytest.raises(DataFormatError, match=r"record 1: field 'instruction' is a list"):
        check_json_files_early(["--validation_file", str(mixed)])
    check_json_files_early(["--train_file", str(mixed), "--skip_invalid_records"])  # stage 2 skips and reports
    check_json_files_early(["--train_file", str(tmp_path / "data.csv")])  # other formats: stage 1 checks them
    check_json_files_early(["--dataset_name", "tatsu-lab/alpaca"])
