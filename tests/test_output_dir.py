"""The output directory: refuse what is not ours, resume what is, delete nothing outside it."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from lmtune.args import args_to_dict, parse_args
from lmtune.validation import validate_args
from lmtune.errors import ConfigError
from lmtune.train.checkpointing import (
    COMPLETE_MARKER,
    commit_checkpoint,
    latest_complete_checkpoint,
    remove_staging_dirs,
)
from lmtune.run_record import ARGS_FILE, read_run_args, write_run_args
from lmtune.train.output_dir import changed_args, clear_earlier_run, prepare_output_dir


def checkpoint(out: Path, step: int, *, complete: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 10}), encoding="utf-8")
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": step}), encoding="utf-8")
    return path


def earlier_run(out: Path, *steps: int, finished: bool = False) -> Path:
    write_run_args(str(out), {"training": {"learning_rate": 0.001}})
    for step in steps:
        checkpoint(out, step)
    if finished:
        (out / "train_results.json").write_text("{}", encoding="utf-8")
    return out


def prepare(out: Path, *, overwrite: bool = False, resume: str | None = None, args=None) -> str | None:
    return prepare_output_dir(str(out), overwrite=overwrite, resume_from_checkpoint=resume, current_args=args)


def test_missing_or_empty_dir_is_a_fresh_run(tmp_path):
    assert prepare(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert prepare(tmp_path / "empty") is None


def test_foreign_dir_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work", encoding="utf-8")
    checkpoint(out, 5)  # even checkpoints: without lmtune_args.json this is not our run
    with pytest.raises(ConfigError, match=r"--output_dir .*mine is not empty and holds files that are not from "
                                          r"lmtune\. Choose a new directory, or pass --overwrite_output_dir"):
        prepare(out)
    with pytest.raises(ConfigError, match=r"holds files that are not from lmtune"):
        prepare(out, resume=str(out / "checkpoint-5"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "thesis.tex"]


def test_overwrite_of_a_foreign_dir_deletes_nothing(tmp_path, caplog):
    out = tmp_path / "mine"
    checkpoint(out, 5)
    (out / "notes.txt").write_text("keep", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert prepare(out, overwrite=True) is None
    clear_earlier_run(str(out))  # no lmtune_args.json: not ours, so nothing goes
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep"
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
    assert "writing into" in caplog.text and "beside the files already there" in caplog.text


def test_interrupted_run_resumes_from_newest_complete_checkpoint(tmp_path, caplog):
    out = earlier_run(tmp_path / "run", 2, 4)
    checkpoint(out, 6, complete=False)  # written by something that does not mark completion
    staging = out / ".staging-checkpoint-8" / "checkpoint-8"
    staging.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert prepare(out) == str(out / "checkpoint-4")
    assert not (out / ".staging-checkpoint-8").exists()
    assert (out / "checkpoint-6").is_dir()  # passed over, not deleted
    assert "checkpoint-6 is incomplete (no lmtune_checkpoint.json); not resuming from it" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'} (step 4 of 10); pass --overwrite_output_dir to start fresh" \
        in caplog.text


def test_run_that_never_reached_a_checkpoint_starts_anew(tmp_path, caplog):
    out = earlier_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert prepare(out) is None
    assert "stopped before its first complete checkpoint; starting anew" in caplog.text


def test_finished_run_is_neither_resumed_nor_overwritten_unasked(tmp_path):
    out = earlier_run(tmp_path / "run", 10, finished=True)
    with pytest.raises(ConfigError, match=r"holds a finished lmtune run \(train_results\.json\)\. Choose a new "
                                          r"directory, pass --overwrite_output_dir to start over"):
        prepare(out)


def test_overwrite_clears_only_the_earlier_runs_files(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.json").write_text("[]", encoding="utf-8")
    out = earlier_run(tmp_path / "run", 2, 4, finished=True)
    (out / "all_results.json").write_text("{}", encoding="utf-8")
    (out / "my_notes.md").write_text("mine", encoding="utf-8")
    os.symlink(outside, out / "checkpoint-99")  # a link named like a checkpoint: never followed
    assert prepare(out, overwrite=True) is None
    assert (out / "checkpoint-2").is_dir()  # nothing removed before the new run's data is checked
    clear_earlier_run(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-99", ARGS_FILE, "my_notes.md"]
    assert (outside / "data.json").read_text(encoding="utf-8") == "[]"


def test_resume_from_a_named_checkpoint(tmp_path, caplog):
    out = earlier_run(tmp_path / "run", 2, 4)
    assert prepare(out, resume=str(out / "checkpoint-2")) == str(out / "checkpoint-2")
    assert prepare(out, resume="latest") == str(out / "checkpoint-4")
    assert prepare(out, resume="True") == str(out / "checkpoint-4")
    hf = checkpoint(tmp_path / "elsewhere", 3, complete=False)  # a stock Trainer checkpoint
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        assert prepare(tmp_path / "new", resume=str(hf)) == str(hf)
    assert "has no lmtune completion marker" in caplog.text


@pytest.mark.parametrize(
    ("make", "value", "expected"),
    [
        (lambda out: None, "{out}/checkpoint-7", r"--resume_from_checkpoint .*checkpoint-7: no such checkpoint "
                                                 r"directory\."),
        (lambda out: (out / "checkpoint-7").mkdir(), "{out}/checkpoint-7",
         r"checkpoint-7: not a complete checkpoint \(no trainer_state\.json\)"),
        (lambda out: None, "latest", r"--resume_from_checkpoint latest: .*run holds no complete checkpoint\."),
    ],
)
def test_unusable_checkpoint_is_refused(tmp_path, make, value, expected):
    out = earlier_run(tmp_path / "run")
    make(out)
    with pytest.raises(ConfigError, match=expected):
        prepare(out, resume=value.format(out=out))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--output_dir .*out is a file; give a directory\."):
        prepare(tmp_path / "out")


def test_changed_arguments_are_reported_on_resume(tmp_path, caplog):
    out = earlier_run(tmp_path / "run", 2)
    current = {"training": {"learning_rate": 0.01, "logging_steps": 5}}
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        prepare(out, args=current)
    assert "the interrupted run used different arguments" in caplog.text
    assert "--learning_rate: 0.001 -> 0.01" in caplog.text
    assert changed_args({"training": {"logging_steps": 1}}, {"training": {"logging_steps": 5}}) == []


def test_latest_complete_checkpoint_orders_by_step_not_name(tmp_path):
    for step in (9, 10, 100):
        checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-100"


def test_saved_arguments_hold_no_token(tmp_path):
    args = parse_args(["--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(tmp_path),
                       "--token", "hf_SECRET123", "--hub_token", "hf_SECRET456"])
    write_run_args(str(tmp_path), args_to_dict(args))
    assert "SECRET" not in (tmp_path / ARGS_FILE).read_text(encoding="utf-8")
    assert read_run_args(str(tmp_path))["args"]["model"]["token"] is None


def test_flag_combinations_that_cannot_work_are_rejected_together(tmp_path):
    (tmp_path / "data_dir").mkdir()
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "m", "--train_file", str(tmp_path / "data_dir"), "--output_dir", str(out),
            "--do_train", "--do_eval", "--resume_from_checkpoint", str(tmp_path / "gone"), "--lora_rank", "0"]
    with pytest.raises(ConfigError) as caught:
        validate_args(parse_args(argv))
    message = str(caught.value)
    for problem in (
        rf"--train_file {tmp_path / 'data_dir'} is a directory; name a data file, or pass the directory as "
        r"--dataset_name DIR",
        r"--do_eval needs validation data: add --validation_file FILE or --validation_split_percentage N",
        rf"--resume_from_checkpoint {tmp_path / 'gone'}: no such checkpoint directory",
        r"--lora_rank must be > 0 \(got 0\)",
    ):
        assert re.search(problem, message), problem
    assert "unsupported file type" not in message


def test_overwrite_and_resume_inside_output_dir_contradict(tmp_path):
    out = earlier_run(tmp_path / "run", 2)
    base = ["--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(out), "--overwrite_output_dir"]
    with pytest.raises(ConfigError, match=r"--overwrite_output_dir would delete .*checkpoint-2, the checkpoint "
                                          r"--resume_from_checkpoint names; drop one of the two flags"):
        validate_args(parse_args(base + ["--resume_from_checkpoint", str(out / "checkpoint-2")]))
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint latest resumes from a checkpoint in "
                                          r"--output_dir, which --overwrite_output_dir clears"):
        validate_args(parse_args(base + ["--resume_from_checkpoint", "latest"]))


def test_commit_marks_and_replaces_an_older_save_of_the_same_step(tmp_path):
    final = tmp_path / "checkpoint-3"
    final.mkdir()
    (final / "adapter_model.safetensors").write_text("old", encoding="utf-8")
    staged = tmp_path / ".staging-checkpoint-3" / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_text("new", encoding="utf-8")
    assert commit_checkpoint(staged, final, 3) == final
    assert (final / "adapter_model.safetensors").read_text(encoding="utf-8") == "new"
    assert json.loads((final / COMPLETE_MARKER).read_text(encoding="utf-8")) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-checkpoint-3", "checkpoint-3"]
    (tmp_path / ".staging-checkpoint-3.old").mkdir()  # what a kill between the two renames leaves
    assert sorted(p.name for p in remove_staging_dirs(tmp_path)) == [".staging-checkpoint-3",
                                                                     ".staging-checkpoint-3.old"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
