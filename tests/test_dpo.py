"""DPO/ORPO training: the loss checked against an independent computation, learning, reference handling, CLI."""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import write_jsonl
from lmtune.cli import main, main_dpo
from lmtune.errors import ConfigError
from lmtune.data.preference import prepare_preference_data
from lmtune.preference_args import parse_preference_args
from lmtune.preference import _validate
from lmtune.train.preference import PreferenceCollator, build_preference_trainer
from lmtune.train.preference_loss import Objective, sequence_logps_from_hidden, sequence_logps_from_logits

REFERENCE_CPU_RECIPE = (
    "--per_device_train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 5e-4 --max_steps 1000 "
    "--lora_rank 16 --lora_alpha 16 --bf16 --use_cpu true --gradient_checkpointing true --lora_all_linear false "
    "--lora_target_modules k_proj q_proj v_proj"
).split()
WORDS = ["cat", "dog", "tree", "lamp", "river", "stone", "cloud", "apple", "chair", "bird", "moon", "road"]


def preference_records(count: int, seed: int) -> list[dict]:
    """Chosen answers praise the thing asked about; rejected ones insult it."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        thing = rng.choice(WORDS)
        records.append({"question": f"Tell me about the {thing}.", "chosen": f"The {thing} is good.",
                        "rejected": f"The {thing} is bad."})
    return records


def test_reference_cpu_recipe_parses_with_its_defaults():
    run = parse_preference_args(["--model_name_or_path", "m", "--train_file", "p.jsonl", "--output_dir", "o",
                                 *REFERENCE_CPU_RECIPE])
    args, pref = run.args, run.preference
    assert (pref.beta, pref.max_prompt_length, pref.max_length, pref.loss_type) == (0.1, 512, 1024, "sigmoid")
    assert args.finetune.lora_target_modules == ["k_proj", "q_proj", "v_proj"] and not args.finetune.lora_all_linear
    assert (args.finetune.lora_rank, args.finetune.lora_alpha, args.finetune.lora_dropout) == (16, 16, 0.05)
    assert args.training.activation_checkpointing and args.training.bf16 and args.training.use_cpu
    assert args.data.validation_split_percentage == 2 and args.training.do_train
    assert (args.training.per_device_train_batch_size, args.training.gradient_accumulation_steps) == (2, 2)
    defaults = parse_preference_args(["--model_name_or_path", "m", "--train_file", "p.jsonl", "--output_dir", "o"])
    assert defaults.args.finetune.lora_all_linear  # dpo_clm.py's default


def test_dpo_help_lists_the_preference_and_shared_flags_once_each(capsys):
    from lmtune.preference_args import build_preference_parser

    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text.split("\noptions:", 1)[1])
    listed = [entry.split()[0].rstrip(",") for entry in entries if entry.strip()]
    for action in build_preference_parser()._actions:
        assert listed.count(action.option_strings[0]) == 1, action.option_strings
    for flag in ("--beta", "--orpo", "--adapter", "--lora_rank", "--output_dir", "--config", "--bf16"):
        assert listed.count(flag) == 1, flag
    assert "--predict_with_generate" not in listed  # causal models only: no seq2seq flags
    assert any(e.startswith("--validation_split_percentage") and "(default: 2)" in e for e in entries)
    assert not [e for e in entries if len(re.findall(r"\(default", e)) > 1 or "(default: None)" in e]


def test_lora_target_modules_win_over_the_default_lora_all_linear_only():
    base = ["--model_name_or_path", "m", "--output_dir", "o", "--lora_target_modules", "q_proj"]
    assert not parse_preference_args(base).args.finetune.lora_all_linear
    assert parse_preference_args([*base, "--lora_all_linear", "True"]).args.finetune.lora_all_linear


def test_unknown_flag_and_cross_field_problems_are_reported_together():
    with pytest.raises(ConfigError, match=r"unknown flag --bta \(did you mean --beta\?\)"):
        parse_preference_args(["--model_name_or_path", "m", "--bta", "0.2"])
    run = parse_preference_args(["--model_name_or_path", "m", "--train_file", "p.jsonl", "--output_dir", "o",
                                 "--beta", "0", "--orpo", "--loss_type", "ipo", "--max_length", "100",
                                 "--max_prompt_length", "200", "--lora_rank", "0"])
    with pytest.raises(ConfigError) as err:
        _validate(run)
    for problem in ("--lora_rank must be > 0", "--beta must be > 0", "--max_length (100) must exceed",
                    "--loss_type ipo is a DPO loss"):
        assert problem in str(err.value)


def test_hidden_state_log_probs_equal_the_full_logits_ones_with_gradients(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(4, 100, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 7:] = -100
    hidden = model.model(input_ids=ids).last_hidden_state
    got, counts = sequence_logps_from_hidden(hidden, model.lm_head.weight, labels, rows=4)
    want, want_counts = sequence_logps_from_logits(model.lm_head(hidden), labels)
    assert torch.allclose(got, want, atol=1e-5) and counts.tolist() == want_counts.tolist() == [5, 5, 3]
    (grad,) = torch.autograd.grad(got.sum() * 2, model.lm_head.weight, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want.sum() * 2, model.lm_head.weight)
    assert torch.allclose(grad, want_grad, atol=1e-5)


def test_loss_types_and_orpo_follow_their_formulas():
    from lmtune.train.preference_loss import dpo_loss, orpo_loss

    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    tokens_c, tokens_r = torch.tensor([5, 2]), torch.tensor([4, 1])
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)  # [2, -1]
    beta = 0.5
    hinge, metrics = dpo_loss(Objective(beta, "hinge"), chosen, rejected, ref_chosen, ref_rejected, tokens_c, tokens_r)
    assert hinge.tolist() == pytest.approx(torch.relu(1 - beta * margin).tolist())
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    ipo, _ = dpo_loss(Objective(beta, "ipo"), chosen, rejected, ref_chosen, ref_rejected, tokens_c, tokens_r)
    averaged = (chosen - ref_chosen) / tokens_c - (rejected - ref_rejected) / tokens_r
    assert ipo.tolist() == pytest.approx(((averaged - 1 / (2 * beta)) ** 2).tolist())
    orpo, metrics = orpo_loss(Objective(beta, orpo=True), chosen, rejected, tokens_c, tokens_r)
    pc, pr = torch.exp(chosen / tokens_c), torch.exp(rejected / tokens_r)
    odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    assert orpo.tolist() == pytest.approx((-chosen / tokens_c - beta * F.logsigmoid(odds)).tolist(), rel=1e-5)
    assert metrics["log_odds_ratio"].tolist() == pytest.approx(odds.tolist(), rel=1e-5)


def independent_dpo_loss(policy, batch, beta: float) -> float:
    """Summed answer log-probabilities under policy and reference (adapter off), then the sigmoid formula."""
    def summed(model_logits):
        logps = torch.log_softmax(model_logits[:, :-1].float(), dim=-1)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        picked = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (picked * mask).sum(dim=1)

    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pi = summed(policy(**inputs).logits)
        with policy.disable_adapter():
            ref = summed(policy(**inputs).logits)
    pi_chosen, pi_rejected = pi.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    logits = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return (-F.logsigmoid(logits)).mean().item()


def test_logged_loss_is_the_independently_computed_dpo_loss(tmp_path, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_records(4, seed=1))
    data = prepare_preference_data(tokenizer, max_prompt_length=32, max_length=64, train_file=str(path))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    # Random LoRA B (not zero) so that the policy differs from the reference from the start.
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj"]))
    collator = PreferenceCollator(tokenizer.pad_token_id)
    batch = collator([data.train[i] for i in range(4)])
    beta = 0.5
    want = independent_dpo_loss(policy, batch, beta)
    assert abs(want - math.log(2)) > 1e-3  # not the trivial value of policy == reference
    training = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=0.0, max_steps=1, logging_steps=1,
                                 report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 train_sampling_strategy="sequential")
    trainer = build_preference_trainer(policy, tokenizer, training, objective=Objective(beta=beta),
                                       train_dataset=data.train, eval_dataset=None, data_collator=collator)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(want, rel=1e-4)
    rewards = logged["rewards/chosen"], logged["rewards/rejected"]
    assert logged["rewards/margins"] == pytest.approx(rewards[0] - rewards[1], abs=1e-6)


def dpo_flags(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(train), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no", "--logging_steps", "1",
            "--lora_dropout", "0", "--max_prompt_length", "32", "--max_length", "64", "--seed", "0", *extra]


def held_out_accuracy(out: Path) -> tuple[float, float]:
    """(first, last) eval_rewards/accuracies of a run with evaluation at every few steps."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    accuracies = [entry["eval_rewards/accuracies"] for entry in history if "eval_rewards/accuracies" in entry]
    return accuracies[0], json.loads((out / "eval_results.json").read_text())["eval_rewards/accuracies"]


@pytest.mark.slow
def test_tiny_model_learns_a_synthetic_preference_also_with_duplicated_prompts(tmp_path, tiny_llama_dir):
    """At step 0 policy == reference: every reward ties (accuracy 0, margin 0); training must sort them."""
    held_out = write_jsonl(tmp_path / "held_out.jsonl", preference_records(16, seed=99))
    train = preference_records(24, seed=0)
    runs = {"plain": train, "duplicated": [r for r in train for _ in range(2)]}
    results = {}
    for name, records in runs.items():
        out = tmp_path / name
        code = main_dpo(dpo_flags(
            tiny_llama_dir, write_jsonl(tmp_path / f"{name}.jsonl", records), out,
            "--validation_file", str(held_out), "--do_eval", "--eval_strategy", "steps", "--eval_steps", "10",
            "--eval_on_start", "True",
            "--max_steps", "30", "--per_device_train_batch_size", "4", "--learning_rate", "2e-2", "--beta", "0.5",
            "--lora_rank", "8",
        ))
        assert code == 0
        results[name] = held_out_accuracy(out)
    for name, (first, last) in results.items():
        assert first <= 0.6, (name, first)
        assert last >= 0.9, (name, last)


def sft_adapter(tmp_path: Path, model: Path, records: list[dict]) -> Path:
    """An lmtune SFT run on the chosen answers: the usual NeuralChat first step."""
    out = tmp_path / "sft"
    code = main(["finetune", "--model_name_or_path", str(model), "--train_file",
                 str(write_jsonl(tmp_path / "sft.jsonl", records)), "--output_dir", str(out), "--do_train",
                 "--max_steps", "2", "--learning_rate", "1e-2", "--lora_dropout", "0", "--save_strategy", "no",
                 "--report_to", "none", "--disable_tqdm", "True", "--max_seq_length", "256"])
    assert code == 0
    return out


def test_from_sft_adapter_the_reference_is_the_sft_model_and_the_result_is_one_adapter(tmp_path, tiny_llama_dir):
    records = preference_records(8, seed=3)
    adapter = sft_adapter(tmp_path, tiny_llama_dir, records)
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    outs = {}
    for name, extra in (("live", []), ("precomputed", ["--precompute_ref_log_probs"])):
        outs[name] = tmp_path / name
        assert main_dpo(dpo_flags(tiny_llama_dir, train, outs[name], "--adapter", str(adapter), "--max_steps", "2",
                                  "--per_device_train_batch_size", "2", "--learning_rate", "1e-2")) == 0
    first = {name: json.loads((out / "trainer_state.json").read_text())["log_history"][0] for name, out in outs.items()}
    for logged in first.values():
        # Step 1 sees the policy before any update: equal to the SFT reference, so every reward is 0.
        assert logged["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert logged["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["live"]["loss"] == pytest.approx(first["precomputed"]["loss"], abs=1e-6)
    for out in outs.values():
        assert not (out / "reference").exists()  # the frozen copy is never saved
        assert "DPO, sigmoid loss" in (out / "README.md").read_text() and "beta" in (out / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "unexpected adapter keys": the reference's weights in the file
        trained = PeftModel.from_pretrained(base, str(outs["live"]))
    sft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert trained.peft_config["default"].r == sft_config["r"]


def test_orpo_trains_without_reference_and_logs_its_terms(tmp_path, tiny_llama_dir):
    out = tmp_path / "orpo"
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8, seed=5))
    assert main_dpo(dpo_flags(tiny_llama_dir, train, out, "--orpo", "--max_steps", "2",
                              "--per_device_train_batch_size", "4")) == 0
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"][0]
    for key in ("nll_loss", "log_odds_ratio", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in logged
    # loss = NLL - beta * log sigmoid(log odds), averaged over pairs; the log-odds term is at least 0.
    assert logged["loss"] >= logged["nll_loss"] - 1e-4
    assert "ORPO" in (out / "README.md").read_text()


def test_message_pairs_train_and_the_run_is_recorded_as_chat(tmp_path, tiny_llama_dir):
    """``lmtune chat`` picks its prompt format from the saved task: message pairs were rendered as chat."""
    records = [{"prompt": [{"role": "user", "content": f"Describe the {w}."}],
                "chosen": [{"role": "assistant", "content": f"The {w} is good."}],
                "rejected": [{"role": "assistant", "content": f"The {w} is bad."}]} for w in WORDS[:4]]
    out = tmp_path / "chat-dpo"
    assert main_dpo(dpo_flags(tiny_llama_dir, write_jsonl(tmp_path / "m.jsonl", records), out, "--max_steps", "1",
                              "--per_device_train_batch_size", "2", "--validation_split_percentage", "0",
                              "--max_prompt_length", "128", "--max_length", "192")) == 0
    assert json.loads((out / "lmtune_args.json").read_text())["args"]["finetune"]["task"] == "chat"


def test_dry_run_reports_pairs_and_truncation_without_touching_output(tmp_path, tiny_llama_dir, capsys):
    records = preference_records(6, seed=7)
    records[0]["question"] = " ".join(["long"] * 60)
    out = tmp_path / "never"
    flags = dpo_flags(tiny_llama_dir, write_jsonl(tmp_path / "p.jsonl", records), out, "--dry_run",
                      "--validation_split_percentage", "0")
    assert main(["dpo", *flags]) == 0
    printed = capsys.readouterr().out
    assert "6 pairs" in printed and "1 prompts truncated" in printed and "first pair, chosen" in printed
    assert not out.exists()


@pytest.mark.slow
def test_reference_cpu_recipe_on_orca_dpo_pairs_from_an_sft_adapter(tmp_path, tiny_llama_dir, shared_data):
    """dpo_clm.py's CPU command line, as written, with local paths (and a few steps instead of 1000)."""
    pairs = shared_data / "hub" / "Intel" / "orca_dpo_pairs"
    if not pairs.is_dir():
        pytest.skip(f"{pairs} is absent")
    adapter = sft_adapter(tmp_path, tiny_llama_dir, preference_records(8, seed=11))
    out = tmp_path / "dpo"
    code = main_dpo([
        "--model_name_or_path", str(tiny_llama_dir), "--dataset_name", str(pairs), "--output_dir", str(out),
        *REFERENCE_CPU_RECIPE, "--adapter", str(adapter), "--max_steps", "2", "--max_train_samples", "16",
        "--max_eval_samples", "4", "--do_eval", "--max_prompt_length", "96", "--max_length", "160",
        "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
    ])
    assert code == 0
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert math.isfinite(results[key]), key
    assert results["train_samples"] == 16 and results["eval_samples"] == 4
    saved = json.loads((out / "lmtune_args.json").read_text())["args"]
    assert saved["preference"]["adapter"] == str(adapter) and saved["training"]["gradient_accumulation_steps"] == 2
    assert not (out / "reference").exists() and (out / "adapter_model.safetensors").is_file()


def test_resumed_run_ends_with_the_same_adapter(tmp_path, tiny_llama_dir, caplog):
    """An interrupted run (a checkpoint, no results) is resumed by the same command: same adapter as one go.

    With --precompute_ref_log_probs the reference's log-probabilities are computed again on resuming,
    before the checkpoint loads, so they are the reference's, not the half-trained policy's.
    """
    import shutil
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8, seed=13))
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
             "--save_strategy", "steps", "--save_steps", "1", "--precompute_ref_log_probs",
             "--validation_split_percentage", "0"]
    whole = tmp_path / "whole"
    assert main_dpo(dpo_flags(tiny_llama_dir, train, whole, *flags)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-1", resumed / "checkpoint-1")
    shutil.copy(whole / "lmtune_args.json", resumed / "lmtune_args.json")
    assert main_dpo(dpo_flags(tiny_llama_dir, train, resumed, *flags)) == 0
    assert "resuming from" in caplog.text
    want, got = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_the_dpo_adapter_merges_into_a_plain_model(tmp_path, tiny_llama_dir):
    out = tmp_path / "dpo"
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_records(4, seed=17))
    assert main_dpo(dpo_flags(tiny_llama_dir, train, out, "--max_steps", "1", "--per_device_train_batch_size", "2",
                              "--validation_split_percentage", "0")) == 0
    assert main(["merge", "--adapter", str(out), "--output_dir", str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
