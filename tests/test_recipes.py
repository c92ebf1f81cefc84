"""examples/: one YAML recipe per reference command line, each equal to its command line, each runnable.

Hub names in the recipes and the reference are replaced on the command line by local paths (the
tiny test model, the local stand-ins of the hub data sets in ../shared/data), the same for both sides.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import T5Config

from lmtune.args import args_to_dict, parse_args
from lmtune.errors import ConfigError
from lmtune.finetuning import run_finetune
from tests.conftest import PROJECT_ROOT, SHARED_DATA, require_reference_page, require_shared_data

EXAMPLES = PROJECT_ROOT / "examples"
DEMO_RECIPE = EXAMPLES / "tiny_cpu_demo.yaml"
# The reference's command lines in page order, and the recipe of each.
REFERENCE_RECIPES = (
    "flan-t5-xl_alpaca_seq2seq", "llama2-7b_evol-codealpaca", "codellama-7b_codealpaca", "mpt-7b_alpaca",
    "falcon-7b_alpaca", "mistral-7b_alpaca", "starcoder_codealpaca", "flan-t5-xl_alpaca_ddp",
    "llama2-7b-chat_alpaca_ddp_ptun", "mpt-7b_alpaca_ddp_lora", "habana_llama2-7b-chat_alpaca",
    "habana_mpt-7b_alpaca", "habana_llama2-7b-chat_alpaca_8cards", "habana_mpt-7b_alpaca_8cards",
    "habana_llama2-70b-chat_alpaca_deepspeed", "habana_mixtral-8x7b_alpaca_deepspeed", "gemma-2b_alpaca_arc",
)
# Where a recipe departs from its command line on purpose: the flags that make the difference.
DEPARTURES = {
    # lmtune refuses P-tuning on packed rows (peft would let packed samples see each other).
    "llama2-7b-chat_alpaca_ddp_ptun": ["--dataset_concatenation", "False"],
}
SEQ2SEQ_RECIPES = {"flan-t5-xl_alpaca_seq2seq", "flan-t5-xl_alpaca_ddp"}
# Gaudi recipes need Habana's stack; they are parsed here, not run.
RUNNABLE = [name for name in REFERENCE_RECIPES if not name.startswith("habana_")]
ALPACA_FILE = SHARED_DATA / "alpaca" / "alpaca_data_first2000.json"
NEOX_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt-neox-20B_tokenizer.json"


def reference_command_lines() -> list[list[str]]:
    """The flags of every finetune_clm.py / finetune_seq2seq.py command line on the reference page."""
    logical = re.sub(r"\\\n", " ", require_reference_page().read_text(encoding="utf-8")).splitlines()
    commands = []
    for line in logical:
        if re.search(r"finetune_(clm|seq2seq)\.py\s+--", line):
            tokens = shlex.split(line)
            script = next(i for i, t in enumerate(tokens) if re.search(r"finetune_(clm|seq2seq)\.py$", t))
            commands.append(tokens[script:])
    return commands


def local_overrides(flags: dict, model_dir: Path, out: Path) -> list[str]:
    """Local stand-ins for the hub names and paths a recipe (or command line) names."""
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(out)]
    if flags.get("dataset_name"):
        argv += ["--dataset_name", str(SHARED_DATA / "hub" / flags["dataset_name"])]
    if flags.get("train_file"):
        argv += ["--train_file", str(ALPACA_FILE)]
    if flags.get("tokenizer_name"):
        argv += ["--tokenizer_name", str(NEOX_TOKENIZER)]
    if flags.get("deepspeed"):
        argv += ["--deepspeed", ""]  # the config file is checked on its own, with DeepSpeed installed
    return argv


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny T5's config and tokenizer, no weights: enough for a dry run of the FLAN-T5 recipes."""
    path = tmp_path_factory.mktemp("tiny-t5")
    T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
             decoder_start_token_id=tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe_flags(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))


def test_every_reference_command_line_has_a_recipe_and_a_readme_row():
    assert len(reference_command_lines()) == len(REFERENCE_RECIPES) == 17
    on_disk = {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert on_disk == set(REFERENCE_RECIPES) | {DEMO_RECIPE.stem}
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in on_disk:
        assert f"`{name}.yaml`" in readme, name


@pytest.mark.parametrize("index", range(len(REFERENCE_RECIPES)), ids=REFERENCE_RECIPES)
def test_recipe_equals_its_reference_command_line(index, tiny_llama_dir, tmp_path):
    name = REFERENCE_RECIPES[index]
    command = reference_command_lines()[index]
    script, reference_argv = command[0], command[1:]
    flags = recipe_flags(name)
    assert flags["model_name_or_path"] == reference_argv[reference_argv.index("--model_name_or_path") + 1]
    overrides = local_overrides(flags, tiny_llama_dir, tmp_path / "out")
    seq2seq = script.startswith("finetune_seq2seq")
    from_reference = parse_args(reference_argv + DEPARTURES.get(name, []) + overrides, seq2seq=seq2seq)
    from_recipe = parse_args(["--config", str(EXAMPLES / f"{name}.yaml"), *overrides], seq2seq=seq2seq)
    assert args_to_dict(from_recipe) == args_to_dict(from_reference)


def test_deepspeed_recipes_name_the_shipped_config():
    config = json.loads((EXAMPLES / "ds_zero3_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is True
    for name in REFERENCE_RECIPES:
        if "deepspeed" in recipe_flags(name):
            assert recipe_flags(name)["deepspeed"] == "examples/ds_zero3_config.json", name


def test_the_reference_ptun_command_line_is_refused_with_a_fix(tiny_llama_dir, tmp_path):
    name = "llama2-7b-chat_alpaca_ddp_ptun"
    reference_argv = reference_command_lines()[REFERENCE_RECIPES.index(name)][1:]
    argv = reference_argv + local_overrides(recipe_flags(name), tiny_llama_dir, tmp_path / "out") + ["--dry_run"]
    with pytest.raises(ConfigError, match="--peft ptun with --dataset_concatenation.*Drop --dataset_concatenation"):
        run_finetune(parse_args(argv))


def deepspeed_installed() -> bool:
    try:  # transformers checks the installed distribution, not just an importable folder
        importlib.metadata.version("deepspeed")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name", [n for n in REFERENCE_RECIPES if "deepspeed" in n])
def test_deepspeed_recipes_parse_with_the_shipped_config(name, tiny_llama_dir, tmp_path):
    config = str(EXAMPLES / "ds_zero3_config.json")
    argv = ["--config", str(EXAMPLES / f"{name}.yaml"), "--model_name_or_path", str(tiny_llama_dir),
            "--output_dir", str(tmp_path / "out"), "--deepspeed", config]
    if not deepspeed_installed():
        with pytest.raises(ConfigError, match="pip install deepspeed"):
            parse_args(argv)
        return
    training = parse_args(argv).training
    assert training.deepspeed == config
    assert training.hf_deepspeed_config.config["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", RUNNABLE)
def test_recipe_runs_as_a_dry_run_on_local_stand_ins(name, tiny_llama_dir, tiny_t5_dir, tmp_path, capsys):
    require_shared_data()
    flags = recipe_flags(name)
    seq2seq = name in SEQ2SEQ_RECIPES
    model_dir = tiny_t5_dir if seq2seq else tiny_llama_dir
    argv = ["--config", str(EXAMPLES / f"{name}.yaml"), *local_overrides(flags, model_dir, tmp_path / "out"),
            "--max_train_samples", "24", "--dry_run"]
    metrics = run_finetune(parse_args(argv, seq2seq=seq2seq))
    text = capsys.readouterr().out
    assert metrics["dry_run_train_kept"] == 24 and metrics["dry_run_steps"] > 0
    assert "lmtune dry run" in text and "[[" in text
    assert ("target (decoder labels):" in text) == seq2seq
    assert ("packing     24 samples in" in text) == bool(flags.get("dataset_concatenation"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tiny_cpu_demo_recipe_end_to_end(demo_model_dir, tmp_path):
    """The demo recipe as its header says to run it, with fewer steps: every artifact of a finished run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmtune.demo import demo_data_path

    (tmp_path / "lmtune-demo-model").symlink_to(demo_model_dir, target_is_directory=True)
    shutil.copy(demo_data_path(), tmp_path / "demo_instructions.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PROJECT_ROOT)}
    command = [sys.executable, "-m", "lmtune", "finetune", "--config", str(DEMO_RECIPE), "--max_steps", "3",
               "--logging_steps", "1", "--eval_steps", "2", "--max_eval_samples", "8", "--max_seq_length", "128"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "lmtune-demo-out"
    for name in ("adapter_model.safetensors", "README.md", "loss_curve.png", "lmtune_args.json",
                 "all_results.json"):
        assert (out / name).is_file(), name
    # A local base is recorded by its absolute path, so the card's command works from any directory.
    base = Path(demo_model_dir).resolve()
    assert f"lmtune chat --model_name_or_path {base} --adapter lmtune-demo-out" in (out / "README.md").read_text()
    # Not a terminal: plain progress lines, no tqdm bars, no library noise.
    steps = re.findall(r"INFO lmtune: (step \d/3) \(", done.stderr)
    assert steps == ["step 1/3", "step 2/3", "step 3/3"]
    assert "INFO lmtune: eval at step 2/3" in done.stderr
    for noise in ("it/s]", "Loading weights", "FutureWarning", "{'loss'"):
        assert noise not in done.stderr + done.stdout, noise
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    losses = []
    for file in events:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            losses += [e.step for e in accumulator.Scalars("train/loss")]
    assert losses == [1, 2, 3]
