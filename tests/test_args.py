"""Flags: the reference's command lines parse and mean what they say; bad flags fail clearly."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from lmtune.args import parse_args
from lmtune.validation import validate_args
from lmtune.errors import ConfigError

REFERENCE_PAGE = PROJECT_ROOT.parent / "shared" / "seed" / "neuralchat-finetuning.md"


def reference_command_lines() -> list[tuple[str, list[str]]]:
    """Every ``finetune_clm.py`` / ``finetune_seq2seq.py`` command line on the reference page."""
    if not REFERENCE_PAGE.is_file():
        return []
    text = REFERENCE_PAGE.read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        match = re.search(r"(finetune_clm|finetune_seq2seq)\.py\s+(--.*)$", line)
        if match:
            found.append((match.group(1), shlex.split(match.group(2))))
    return found


def localize(argv: list[str], model_dir: Path, data_file: Path) -> list[str]:
    """Swap hub names for local paths, as a user of the reference would."""
    local = {"--model_name_or_path": str(model_dir), "--tokenizer_name": str(model_dir),
             "--train_file": str(data_file), "--dataset_name": str(data_file.parent)}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in local:
            out += [argv[i], local[argv[i]]]
            i += 2
        elif argv[i] == "--deepspeed":  # needs the deepspeed package; covered by the distributed tests
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


COMMANDS = reference_command_lines()


def test_reference_page_has_all_command_lines():
    if not COMMANDS:
        pytest.skip(f"reference page {REFERENCE_PAGE} is absent")
    scripts = [script for script, _ in COMMANDS]
    assert scripts.count("finetune_seq2seq") == 2
    assert scripts.count("finetune_clm") >= 15


@pytest.mark.parametrize("index", range(len(COMMANDS)) if COMMANDS else [pytest.param(0, marks=pytest.mark.skip)])
def test_reference_command_line_parses(index, tmp_path):
    script, argv = COMMANDS[index]
    args = parse_args(localize(argv, tmp_path, tmp_path / "alpaca_data.json"), seq2seq=script == "finetune_seq2seq")
    validate_args(args)
    given = dict(zip(argv, argv[1:]))
    assert args.finetune.peft == given.get("--peft", "lora")
    assert args.training.learning_rate == float(given["--learning_rate"])
    assert args.training.per_device_train_batch_size == int(given["--per_device_train_batch_size"])
    assert args.training.do_train
    assert args.training.use_cpu  # no GPU here: the run goes to the CPU, as the reference's --no_cuda said
    if "--dataset_concatenation" in argv:
        assert args.data.dataset_concatenation
    if given.get("--use_fast_tokenizer", "").lower() == "false":
        assert args.model.use_fast_tokenizer is False
    if "--group_by_length" in argv:
        assert args.training.train_sampling_strategy == "group_by_length"
    if "--lora_target_modules" in argv:
        assert args.finetune.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    if given.get("--ddp_backend") == "ccl":
        assert args.finetune.use_oneccl


def test_legacy_flags_are_rewritten_with_one_notice(caplog):
    args = parse_args(["--output_dir", "o", "--no_cuda", "--evaluation_strategy", "steps", "--eval_steps", "5",
                       "--group_by_length", "True", "--gradient_checkpointing", "True", "--warmup_ratio", "0.03"])
    assert args.training.use_cpu is True
    assert args.training.eval_strategy == "steps"
    assert args.training.train_sampling_strategy == "group_by_length"
    assert args.training.activation_checkpointing is True
    assert args.training.warmup_steps == pytest.approx(0.03)
    notices = [r.message for r in caplog.records if "legacy spelling" in r.message]
    assert len(notices) == 5  # one per legacy flag used


def test_group_by_length_false_keeps_random_sampling():
    args = parse_args(["--output_dir", "o", "--group_by_length", "False"])
    assert args.training.train_sampling_strategy == "random"


def test_reference_defaults():
    args = parse_args(["--output_dir", "o"])
    assert (args.data.max_seq_length, args.data.max_source_length, args.data.max_target_length) == (512, 384, 128)
    assert (args.finetune.lora_rank, args.finetune.lora_alpha, args.finetune.lora_dropout) == (8, 16, 0.05)
    assert args.finetune.peft == "lora" and args.finetune.task == "completion"
    assert args.finetune.train_on_inputs is False and args.finetune.eval_ppl is True
    assert args.data.num_beams == 4 and args.data.validation_split_percentage == 0
    assert args.model.trust_remote_code is False and args.model.use_fast_tokenizer is True


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown flag --lora_rnk \(did you mean --lora_rank\?\)"):
        parse_args(["--output_dir", "o", "--lora_rnk", "4"])


def test_abbreviated_flags_are_not_guessed():
    with pytest.raises(ConfigError, match="unknown flag --lora_r"):
        parse_args(["--output_dir", "o", "--lora_r", "4"])


def test_bad_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid arguments"):
        parse_args(["--output_dir", "o", "--peft", "lorra"])


def test_config_file_with_command_line_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\noutput_dir: out\nlora_rank: 4\nlora_target_modules: [q_proj, k_proj]\n"
                      "bf16: true\n", encoding="utf-8")
    args = parse_args(["--config", str(recipe), "--lora_rank", "32"])
    assert args.finetune.lora_rank == 32
    assert args.finetune.lora_target_modules == ["q_proj", "k_proj"]
    assert args.model.model_name_or_path == "m" and args.training.bf16


def test_single_json_argument_is_a_config(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "out", "peft": "prefix"}), encoding="utf-8")
    assert parse_args([str(path)]).finetune.peft == "prefix"


def test_unknown_key_in_config_file_fails(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nlora_rnk: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean --lora_rank"):
        parse_args(["--config", str(recipe)])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file"):
        parse_args(["--config", "nope.yaml"])


def test_validate_collects_every_problem():
    args = parse_args(["--lora_rank", "0", "--lora_dropout", "1.5", "--max_seq_length", "0", "--do_train",
                       "--qlora", "--full_finetune", "--train_file", "data.xlsx"])
    with pytest.raises(ConfigError) as info:
        validate_args(args)
    message = str(info.value)
    for expected in ("--model_name_or_path is required", "--output_dir is required", "--lora_rank must be > 0 (got 0)",
                     "--lora_dropout must be in [0, 1) (got 1.5)", "--max_seq_length must be > 0 (got 0)",
                     "--qlora and --full_finetune exclude each other", "data.xlsx: unsupported file type"):
        assert expected in message


def test_python_api_accepts_the_same_arguments(tmp_path):
    from lmtune.argv import config_to_argv

    argv = config_to_argv({"output_dir": str(tmp_path), "lora_target_modules": ["q_proj", "v_proj"],
                           "dataset_concatenation": True, "peft": "lora", "max_steps": 3})
    args = parse_args(argv)
    assert args.finetune.lora_target_modules == ["q_proj", "v_proj"]
    assert args.data.dataset_concatenation and args.training.max_steps == 3


# --- one parse: every flag in --help, the model's kind from its config, one error ----------------


def test_finetune_help_lists_every_flag_once_with_one_default(capsys):
    from lmtune.args import build_parser
    from lmtune.cli import main

    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        assert action.option_strings[0] in text, action.option_strings
    for flag in ("--config FILE", "--predict_with_generate", "--generation_max_length", "--lora_rank"):
        assert flag in text
    entries = re.split(r"\n  (?=-)", text)
    assert not [e for e in entries if len(re.findall(r"\(default", e)) > 1 or "(default: None)" in e]
    assert any("Split of --dataset_name to train on (default: train," in e and "(default: None)" not in e
               for e in entries)
    assert "(seq2seq models only)" in next(e for e in entries if e.startswith("--predict_with_generate"))


def test_seq2seq_flags_are_refused_for_a_causal_model():
    argv = ["--output_dir", "o", "--predict_with_generate", "--generation_num_beams", "2"]
    assert parse_args(argv, seq2seq=True).training.predict_with_generate is True
    with pytest.raises(ConfigError, match=r"--generation_num_beams, --predict_with_generate: for seq2seq "
                                          r"\(encoder-decoder\) models only"):
        parse_args(argv, seq2seq=False)


def test_use_cpu_and_output_dir_come_from_the_parse_not_a_scan():
    args = parse_args(["--output_dir", "o", "--device", "cpu"])
    assert args.training.use_cpu is True and args.training.output_dir == "o"
    assert parse_args(["--device", "cpu", "--use_cpu", "False"]).training.use_cpu is False
    assert parse_args([]).training.output_dir is None  # not transformers' invented "trainer_output"


def test_one_parse_and_one_config_load_per_run(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    import lmtune.args
    import lmtune.finetuning

    parses, loads = [], []
    real_parse, real_load = lmtune.args.HfArgumentParser.parse_known_args, lmtune.finetuning.load_config
    monkeypatch.setattr(lmtune.args.HfArgumentParser, "parse_known_args",
                        lambda self, *a, **k: parses.append(1) or real_parse(self, *a, **k))
    monkeypatch.setattr(lmtune.finetuning, "load_config", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file), "--output_dir",
            str(tmp_path / "out"), "--do_train", "--dry_run", "--max_seq_length", "128", "--report_to", "none"]
    args = lmtune.finetuning.parse_for_model(argv)
    assert args.model_config is not None and args.model_config.model_type == "llama"
    lmtune.finetuning.run_finetune(args)
    assert (len(parses), len(loads)) == (1, 1)


def test_every_check_joins_one_error(tiny_llama_dir, tmp_path):
    from lmtune.finetuning import run_finetune

    argv = ["--model_name_or_path", str(tiny_llama_dir), "--train_file", "t.json", "--output_dir", str(tmp_path),
            "--lora_rank", "0", "--report_to", "no_such_tracker", "--peft", "prompt",
            "--dataset_concatenation"]
    with pytest.raises(ConfigError) as err:
        run_finetune(parse_args(argv))
    message = str(err.value)
    assert message.startswith("invalid arguments:") and "--lora_rank must be > 0 (got 0)" in message
    assert "no_such_tracker" in message and "--peft prompt with --dataset_concatenation" in message
