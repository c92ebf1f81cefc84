"""The real command line, end to end, on a tiny model: artifacts, logs, loss, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmtune.cli import main, main_clm
from lmtune.finetuning import finetune
from lmtune.model.packed_attention import PACKED_SDPA
from test_families import trainer_spy  # noqa: F401 (fixture)


def base_flags(model_dir, data, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out),
            "--do_train", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lora_rank", "8",
            "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no", "--no_cuda", *extra]


def test_finetune_clm_writes_every_artifact_and_the_loss_falls(demo_model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main_clm(base_flags(demo_model_dir, alpaca_file, out, "--max_steps", "30", "--logging_steps", "5",
                               "--do_eval", "--validation_split_percentage", "20", "--lora_all_linear",
                               "--dataset_concatenation", "--max_seq_length", "256"))
    assert code == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_results.json", "eval_results.json", "all_results.json", "lmtune_args.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_ppl"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-4)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8
    saved = json.loads((out / "lmtune_args.json").read_text())
    assert saved["args"]["finetune"]["lora_all_linear"] is True and saved["versions"]["transformers"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"lmtune: training loss {results['train_loss']:.4f}, eval loss {results['eval_loss']:.4f}, "
        f"eval perplexity {results['eval_ppl']:.2f}; adapter in {out}")
    # Packed: the 32 training samples sit in fewer rows, and each number is called what it is.
    assert results["train_samples"] == 32 and results["train_rows"] < 32

    # The adapter is plain PEFT: it loads with peft and changes the base model's outputs.
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    ids = torch.tensor([[1, 40, 41, 42]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(tuned(ids).logits, before)
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("mlp" in k for k in weights)


def test_python_api_runs_the_same_job(tiny_llama_dir, alpaca_file, tmp_path):
    metrics = finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file),
                       output_dir=str(tmp_path / "api"), do_train=True, max_steps=2, report_to="none",
                       save_strategy="no", disable_tqdm=True, per_device_train_batch_size=2)
    assert metrics["train_loss"] > 0 and metrics["train_samples"] == 40
    assert (tmp_path / "api" / "adapter_model.safetensors").is_file()


def test_packed_and_unpacked_first_step_loss_agree(tiny_llama_dir, alpaca_file, tmp_path, trainer_spy):
    # One step over all 40 samples: packing changes the rows, not the supervised tokens or their loss.
    # The packed run attends per sample (model/packed_attention.py), the unpacked one with stock SDPA.
    common = dict(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), do_train=True, max_steps=1,
                  per_device_train_batch_size=40, report_to="none", save_strategy="no", disable_tqdm=True,
                  max_seq_length=256, lora_dropout=0.0)
    unpacked = finetune(output_dir=str(tmp_path / "u"), **common)
    packed = finetune(output_dir=str(tmp_path / "p"), dataset_concatenation=True, **common)
    assert packed["train_rows"] < packed["train_samples"] == unpacked["train_samples"] == 40
    assert "train_rows" not in unpacked
    assert packed["train_loss"] == pytest.approx(unpacked["train_loss"], rel=1e-4)
    assert [trainer.model.config._attn_implementation for trainer in trainer_spy] == ["sdpa", PACKED_SDPA]


def test_failure_exits_non_zero_with_one_paragraph(tmp_path, capsys):
    code = main(["finetune", "--model_name_or_path", str(tmp_path / "missing"), "--train_file",
                 str(tmp_path / "x.json"), "--output_dir", str(tmp_path / "o"), "--do_train"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmtune: error: --model_name_or_path") and "Traceback" not in err


def test_bad_data_fails_before_the_model_loads(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n', encoding="utf-8")
    code = main_clm(base_flags(tiny_llama_dir, bad, tmp_path / "o", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "line 2" in err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_non_empty_foreign_output_dir_is_refused(tiny_llama_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main_clm(base_flags(tiny_llama_dir, alpaca_file, out, "--max_steps", "1"))
    assert code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_module_entry_point_runs_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmtune.finetune_clm", "--lora_rnk", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown flag --lora_rnk (did you mean --lora_rank?)" in result.stderr


def test_hub_style_dataset_directory_and_streaming(tiny_llama_dir, shared_data, tmp_path):
    hub = shared_data / "hub"
    common = dict(model_name_or_path=str(tiny_llama_dir), do_train=True, max_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4, max_train_samples=12)
    code = finetune(output_dir=str(tmp_path / "code"), dataset_name=str(hub / "sahil2801" / "CodeAlpaca-20k"),
                    task="code-generation", **common)
    assert code["train_samples"] == 12
    streamed = finetune(output_dir=str(tmp_path / "stream"), dataset_name=str(hub / "tatsu-lab" / "alpaca"),
                        streaming=True, **common)
    assert streamed["train_samples"] == 12


def test_evaluation_at_the_last_step_is_not_run_twice(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    from lmtune.train.trainer import LmtuneTrainer

    calls = []
    evaluate = LmtuneTrainer.evaluate
    monkeypatch.setattr(LmtuneTrainer, "evaluate", lambda self, *a, **k: calls.append(1) or evaluate(self, *a, **k))
    out = tmp_path / "out"
    metrics = finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(out),
                       do_train=True, do_eval=True, validation_split_percentage=20, max_steps=2,
                       eval_strategy="steps", eval_steps=2, report_to="none", save_strategy="no", disable_tqdm=True,
                       per_device_train_batch_size=4)
    assert len(calls) == 1  # the Trainer's own evaluation at step 2; the final report reuses it
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = next(entry for entry in history if "eval_loss" in entry)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_loss"] == metrics["eval_loss"] == logged["eval_loss"] and saved["eval_samples"] == 8
    assert saved["eval_ppl"] == pytest.approx(torch.tensor(logged["eval_loss"]).exp().item(), rel=1e-5)


def test_a_jinja_chat_template_is_saved_with_the_tokenizer(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmtune.chat.args import ChatArguments
    from lmtune.chat.session import build_session, load_chat_model

    template = tmp_path / "chatml.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", encoding="utf-8")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(data), task="chat", chat_template=str(template),
             output_dir=str(out), do_train=True, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    template.unlink()  # the run's output alone must carry the format
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")
    args = ChatArguments(model_name_or_path=str(tiny_llama_dir), adapter=str(out))
    session = build_session(args, *load_chat_model(args))
    assert session.tokenizer.decode(session.prompt_ids("Hi")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
