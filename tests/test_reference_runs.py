"""Each single-node CPU command line of the reference page trains, with local paths for hub names.

The command lines are read from ``../shared/seed/neuralchat-finetuning.md`` (LLaMA-2 on
evol-codealpaca, CodeLlama and StarCoder on CodeAlpaca, MPT with its separate gpt-neox-20b
tokenizer, Falcon, Mistral, Gemma), run through the ``finetune_clm`` entry point exactly as
written, with a tiny random model of the right family in place of the hub model, the hub
stand-ins in ``../shared/data/hub`` in place of hub data sets, and a few flags appended to
keep the run short (the last value of a flag wins, as in argparse).
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import PROJECT_ROOT, SHARED_DATA
from lmtune.cli import main_clm
from test_families import FAMILIES, build_family

REFERENCE_PAGE = PROJECT_ROOT.parent / "shared" / "seed" / "neuralchat-finetuning.md"
FAMILY_OF = {"llama-2": "llama", "codellama": "llama", "mpt": "mpt", "falcon": "falcon", "mistral": "mistral",
             "starcoder": "starcoder", "gemma": "gemma"}
SHORT_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_train_samples", "8",
             "--max_seq_length", "128", "--logging_steps", "1", "--disable_tqdm", "True"]


def single_node_cpu_command_lines() -> list[list[str]]:
    """``python finetune_clm.py ...`` lines that are neither Gaudi (hpu) nor multi-process."""
    if not REFERENCE_PAGE.is_file():
        return []
    text = REFERENCE_PAGE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [m.group(1) for m in re.finditer(r"^python finetune_clm\.py\s+(--.*)$", text, flags=re.M)]
    return [shlex.split(line) for line in lines if '"hpu"' not in line]


COMMANDS = single_node_cpu_command_lines()


def _family(argv: list[str]) -> str:
    name = argv[argv.index("--model_name_or_path") + 1].lower()
    return next(family for key, family in FAMILY_OF.items() if key in name)


def _localize(argv, model_dir, tokenizer_name, out) -> list[str]:
    local = {"--model_name_or_path": str(model_dir), "--output_dir": str(out),
             "--train_file": str(SHARED_DATA / "files" / "alpaca_small.json")}
    if tokenizer_name:
        local["--tokenizer_name"] = tokenizer_name
    result = []
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if previous in local:
            result.append(local[previous])
        elif previous == "--dataset_name":
            result.append(str(SHARED_DATA / "hub" / arg))
        else:
            result.append(arg)
    return result + SHORT_RUN


def test_page_lists_the_seven_single_node_command_lines():
    if not COMMANDS:
        pytest.skip(f"reference page {REFERENCE_PAGE} is absent")
    assert sorted(_family(argv) for argv in COMMANDS) == sorted(
        ["llama", "llama", "mpt", "falcon", "mistral", "starcoder", "gemma"])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)) if COMMANDS else [pytest.param(0, marks=pytest.mark.skip)])
def test_reference_command_line_trains(index, tmp_path, tokenizer):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    argv = COMMANDS[index]
    model_dir, tokenizer_name = build_family(FAMILIES[_family(argv)], tmp_path / "model", tokenizer)
    out = tmp_path / "out"
    assert main_clm(_localize(argv, model_dir, tokenizer_name, out)) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] > 0
    saved = json.loads((out / "lmtune_args.json").read_text())["args"]
    assert saved["data"]["dataset_concatenation"] == ("--dataset_concatenation" in argv)
    if "--task" in argv:
        assert saved["finetune"]["task"] == "code-generation"
