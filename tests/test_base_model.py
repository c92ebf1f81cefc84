"""The base model an adapter records: absolute for a local directory, a hub id as given; chat, eval and
merge find it from any directory when --model_name_or_path is not given."""

from __future__ import annotations

import json
import shutil

import pytest

from lmtune.cli import main
from lmtune.errors import ConfigError
from lmtune.finetuning import finetune
from lmtune.model.base_model import absolute_model_path, recorded_base_model, resolve_base_model

from conftest import write_jsonl


def test_hub_ids_stay_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert absolute_model_path("models/tiny") == str(tmp_path / "models" / "tiny")
    assert absolute_model_path("./models/../models/tiny") == str(tmp_path / "models" / "tiny")
    assert absolute_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert absolute_model_path(None) is None


def test_recorded_base_prefers_the_run_record(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert recorded_base_model(adapter) is None
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert recorded_base_model(adapter) == "org/base"
    (adapter / "lmtune_args.json").write_text(json.dumps({"args": {"model": {"model_name_or_path": "/m/base"}}}))
    assert recorded_base_model(adapter) == "/m/base"
    assert resolve_base_model("given", adapter, "lmtune chat") == "given"
    with pytest.raises(ConfigError, match=r"--adapter .*empty does not record its base model; pass "
                                          r"--model_name_or_path BASE"):
        resolve_base_model(None, tmp_path / "empty", "lmtune merge")
    with pytest.raises(ConfigError, match="lmtune chat: --model_name_or_path is required"):
        resolve_base_model(None, None, "lmtune chat")


@pytest.mark.slow
def test_adapter_trained_from_a_relative_path_is_used_from_elsewhere(tiny_llama_dir, demo_records, tmp_path,
                                                                    monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_llama_dir, work / "tiny")
    write_jsonl(work / "data.jsonl", demo_records[:16])
    monkeypatch.chdir(work)
    finetune(model_name_or_path="./tiny", train_file="data.jsonl", output_dir="out", do_train=True, max_steps=2,
             per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True)
    base = str(work / "tiny")
    assert json.loads((work / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert json.loads((work / "out" / "lmtune_args.json").read_text())["args"]["model"]["model_name_or_path"] == base

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = str(work / "out")
    capsys.readouterr()
    assert main(["chat", "--adapter", adapter, "--prompt", "Name a colour.", "--max_new_tokens", "2"]) == 0
    assert main(["merge", "--adapter", adapter, "--output_dir", "merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()
    assert main(["eval", "--adapter", adapter, "--task", "perplexity", "--validation_file",
                 str(work / "data.jsonl"), "--max_eval_samples", "4", "--output_dir", "eval"]) == 0
    assert "error" not in capsys.readouterr().err
    evaluated = json.loads((elsewhere / "eval" / "eval_results.json").read_text())["evaluated"]
    assert evaluated == {"task": "perplexity", "model": base, "adapter": adapter, "max_eval_samples": 4,
                         "data": {"validation_file": str(work / "data.jsonl")}}
