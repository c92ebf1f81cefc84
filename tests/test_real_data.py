"""A dry run over every full data file the reference names, as a user would start one (``../shared/data``).

Real data sets hold records with an empty response (the 52k Alpaca file, tatsu-lab/alpaca,
CodeAlpaca-20k, SlimOrca) or instruction (Intel's domain file): each run must leave exactly
those out, name the first in one warning, and prepare everything else.
"""

from __future__ import annotations

import logging

import pytest

from lmtune.finetuning import parse_for_model, run_finetune

from conftest import require_shared_data

# (data flags relative to ../shared/data, task, records in the source, records with an empty text field,
#  the first of them). Counts checked by reading each file (see the PR that added this test).
REFERENCE_DATA = {
    "alpaca_data_52k": (["--train_file", "alpaca/alpaca_data_52k_en_from_open-chinese.json"], "completion",
                        52002, 49, "record 284: field 'output' is empty"),
    "intel_domain": (["--train_file", "intel/intel_domain.json"], "completion", 2167, 1,
                     "record 71: field 'instruction' is empty"),
    "tatsu-lab/alpaca": (["--dataset_name", "hub/tatsu-lab/alpaca"], "completion", 2000, 4,
                         "record 284: field 'output' is empty"),
    "CodeAlpaca-20k": (["--dataset_name", "hub/sahil2801/CodeAlpaca-20k"], "code-generation", 2017, 2,
                       "record 237: field 'output' is empty"),
    "evol-codealpaca-v1": (["--dataset_name", "hub/theblackcat102/evol-codealpaca-v1"], "code-generation",
                           4535, 0, None),
    "ultrachat_200k": (["--dataset_name", "hub/HuggingFaceH4/ultrachat_200k"], "chat", 2433, 0, None),
    "cnn_dailymail": (["--dataset_name", "hub/cnn_dailymail", "--dataset_config_name", "3.0.0"], "summarization",
                      175, 0, None),
    "SlimOrca": (["--dataset_name", "hub/Open-Orca/SlimOrca"], "chat", 2100, 4,
                 "record 284: message 2: the gpt message is empty"),
    "orca_dpo_pairs": (["--dataset_name", "hub/Intel/orca_dpo_pairs"], "completion", 658, 0, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_DATA))
def test_dry_run_over_the_full_reference_data(name, tiny_llama_dir, tmp_path, caplog):
    data = require_shared_data()
    flags, task, total, empty, first = REFERENCE_DATA[name]
    flags = [str(data / value) if flag in ("--train_file", "--dataset_name") else value
             for flag, value in zip(["", *flags], flags)]
    argv = ["--model_name_or_path", str(tiny_llama_dir), *flags, "--task", task, "--output_dir",
            str(tmp_path / "out"), "--dry_run", "--report_to", "none"]
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        metrics = run_finetune(parse_for_model(argv))
    left_out = [r.getMessage() for r in caplog.records if "empty text field" in r.getMessage()]
    assert metrics["dry_run_train_records"] == total - (empty or 0)
    if empty:
        assert len(left_out) == 1 and f"left out {empty} of {total} records" in left_out[0]
        assert f"({first};" in left_out[0] or f"({first})" in left_out[0]
    assert metrics["dry_run_train_kept"] > 0.95 * metrics["dry_run_train_records"]
    assert not (tmp_path / "out").exists()
