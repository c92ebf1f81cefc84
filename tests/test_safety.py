"""Safe by default: a full disk costs one checkpoint, never the previous one; weights load from
safetensors unless pickle is allowed; model code runs only with --trust_remote_code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import lmtune.finetuning as finetune_module
from lmtune.args import parse_args
from lmtune.cli import EXIT_USER_ERROR, main_clm
from lmtune.errors import ConfigError
from lmtune.finetuning import parse_for_model, run_finetune
from lmtune.model.load import load_config, load_model, load_tokenizer
from lmtune.train.checkpointing import COMPLETE_MARKER, CheckpointSaveError


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: big enough for one tiny checkpoint, easy to fill."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and the mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a size-limited tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class FillDiskAfterFirstSave(TrainerCallback):
    """Leaves a few KiB free once checkpoint-1 is saved, so that saving checkpoint-2 runs out of space."""

    def __init__(self, filler: Path) -> None:
        self.filler = filler

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            with self.filler.open("wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
            os.truncate(self.filler, max(self.filler.stat().st_size - 8192, 0))


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(small_disk, tiny_llama_dir, alpaca_file,
                                                                   monkeypatch):
    out = small_disk / "out"
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file), "--output_dir", str(out),
            "--do_train", "--max_steps", "3", "--save_steps", "1", "--per_device_train_batch_size", "4",
            "--max_seq_length", "256", "--report_to", "none", "--disable_tqdm", "True", "--use_cpu", "True"]
    filler = small_disk / "filler"
    build = finetune_module.build_trainer

    def build_with_filler(*args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), FillDiskAfterFirstSave(filler)]
        return build(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "build_trainer", build_with_filler)
    with pytest.raises(CheckpointSaveError, match=r"saving checkpoint-2 into .*/out failed: .*Free space there: "
                                                  r"0\.\d MiB\. The partial save was removed and the last complete "
                                                  r"checkpoint, checkpoint-1, is intact\. Free disk space"):
        run_finetune(parse_for_model(argv))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-1"]
    kept = out / "checkpoint-1"
    assert (kept / COMPLETE_MARKER).is_file()
    assert json.loads((kept / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 1
    assert load_file(kept / "adapter_model.safetensors")  # readable, not truncated

    filler.unlink()  # space freed: the same command picks up where it stopped
    monkeypatch.setattr(finetune_module, "build_trainer", build)
    metrics = run_finetune(parse_for_model(argv))
    assert metrics["train_loss"] > 0 and (out / "train_results.json").is_file()


@pytest.fixture
def pickle_only_model(tmp_path, tiny_llama_dir) -> Path:
    """The tiny model with its weights as a pickle ``pytorch_model.bin`` and no safetensors."""
    path = tmp_path / "pickle-model"
    shutil.copytree(tiny_llama_dir, path)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")
    return path


def test_pickle_weights_need_an_explicit_opt_in(pickle_only_model, tiny_llama_dir):
    config = load_config(str(pickle_only_model))
    with pytest.raises(ConfigError, match=r"--model_name_or_path .*pickle-model holds only pickle weights "
                                          r"\(pytorch_model\.bin\)\. Loading a pickle file can run arbitrary code, so "
                                          r"lmtune loads model weights from safetensors only\. Convert the weights to "
                                          r"safetensors .*or pass --allow_pickle_weights True if you trust these files"):
        load_model(str(pickle_only_model), config)
    model = load_model(str(pickle_only_model), config, allow_pickle_weights=True)
    expected = load_file(tiny_llama_dir / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, expected["model.embed_tokens.weight"])


def test_cli_refuses_pickle_weights_after_checking_the_data(pickle_only_model, alpaca_file, tmp_path, capsys):
    base = ["--model_name_or_path", str(pickle_only_model), "--train_file", str(alpaca_file), "--do_train",
            "--report_to", "none", "--max_steps", "1", "--use_cpu", "True"]
    assert parse_args(base + ["--output_dir", "x"]).model.allow_pickle_weights is False
    assert main_clm(base + ["--output_dir", str(tmp_path / "out")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "holds only pickle weights (pytorch_model.bin)" in err and "Traceback" not in err
    assert main_clm(base + ["--output_dir", str(tmp_path / "out2"), "--allow_pickle_weights", "True",
                            "--save_strategy", "no"]) == 0
    assert (tmp_path / "out2" / "adapter_model.safetensors").is_file()


@pytest.fixture
def remote_code_model(tmp_path) -> Path:
    """A model whose config and tokenizer name Python files shipped beside them."""
    path = tmp_path / "custom-model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "lmtune-custom", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
    }), encoding="utf-8")
    # If this ever ran, the test would see the file it creates.
    code = f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\n"
    for name in ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py"):
        (path / name).write_text(code, encoding="utf-8")
    return path


def test_model_code_never_runs_without_trust_remote_code(remote_code_model, tmp_path):
    argv = ["--model_name_or_path", str(remote_code_model), "--train_file", "t.json", "--output_dir", "o"]
    assert parse_args(argv).model.trust_remote_code is False
    assert parse_args(argv + ["--trust_remote_code", "True"]).model.trust_remote_code is True
    with pytest.raises(ConfigError, match=r"custom-model: the model config needs Python code that ships with the "
                                          r"model \(configuration_custom\.py, modeling_custom\.py\), and lmtune does "
                                          r"not run such code unless told to\. Read that code, then pass "
                                          r"--trust_remote_code True if you trust it\."):
        load_config(str(remote_code_model))
    with pytest.raises(ConfigError, match=r"custom-model: the (tokenizer|model config) needs Python code .*"
                                          r"--trust_remote_code True"):
        load_tokenizer(str(remote_code_model))
    assert not (tmp_path / "ran").exists()


def test_atomic_saves_keep_rotation_and_the_best_checkpoint(tiny_llama_dir, alpaca_file, tmp_path):
    """The stock Trainer's save_total_limit and best-checkpoint tracking still work through the staging rename."""
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file), "--output_dir", str(out),
            "--do_train", "--do_eval", "--validation_split_percentage", "20", "--max_steps", "4",
            "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1", "--save_total_limit", "2",
            "--load_best_model_at_end", "True", "--metric_for_best_model", "loss", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--max_seq_length", "256", "--report_to", "none",
            "--disable_tqdm", "True", "--use_cpu", "True"]
    run_finetune(parse_for_model(argv))
    best = Path(json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))["best_model_checkpoint"])
    assert best.parent == out and (best / COMPLETE_MARKER).is_file()
    left = sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint")))
    assert "checkpoint-4" in left and best.name in left and len(left) <= 2
    assert all((out / name / COMPLETE_MARKER).is_file() for name in left)
    saved_best = json.loads((best / "trainer_state.json").read_text(encoding="utf-8"))["best_model_checkpoint"]
    assert ".staging" not in saved_best

    with pytest.raises(ConfigError, match=r"holds a finished lmtune run \(train_results\.json\)"):
        run_finetune(parse_for_model(argv))  # the same command again: nothing to resume, nothing overwritten
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    again = argv[: argv.index("--do_eval")] + ["--max_steps", "1", "--save_steps", "1", "--overwrite_output_dir",
                                               "--report_to", "none", "--use_cpu", "True", "--max_seq_length", "256"]
    run_finetune(parse_for_model(again))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # a fresh run, old ones cleared
    assert json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 1
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
