"""Progress display, logging backends and quiet messages: unit checks plus one tiny real run."""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lmtune.errors import ConfigError
from lmtune.finetuning import finetune
from lmtune.train import progress
from lmtune.train.progress import (
    LogLinesCallback,
    OnceFilter,
    ProgressBarCallback,
    check_report_to,
    configure_messages,
    install_progress,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def training_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


def test_log_lines_show_step_loss_lr_tokens_per_second_and_eta(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="lmtune")
    args, control = training_args(tmp_path), TrainerControl()
    state = TrainerState(max_steps=10, global_step=0, epoch=0.0, num_input_tokens_seen=0)
    callback = LogLinesCallback()
    callback.on_train_begin(args, state, control)
    clock.now += 4.0
    state.global_step, state.epoch, state.num_input_tokens_seen = 2, 0.5, 2000
    callback.on_log(args, state, control, logs={"loss": 1.23456, "grad_norm": 0.5, "learning_rate": 1e-4,
                                                "epoch": 0.5, "train_runtime": 4.0, "train_tokens_per_second": 500})
    clock.now += 3.0
    callback.on_log(args, state, control, logs={"eval_loss": 2.0, "eval_ppl": 7.389, "eval_runtime": 3.0,
                                                "eval_samples_per_second": 5.0, "epoch": 0.5})
    state.global_step = 10
    callback.on_log(args, state, control, logs={"train_runtime": 65.0, "train_samples_per_second": 3.1,
                                                "total_flos": 1e9, "train_loss": 1.5, "epoch": 2.5})
    lines = [r.getMessage() for r in caplog.records if r.name == "lmtune.train.progress"]
    assert lines == [
        "step 2/10 (20%) · epoch 0.50 · loss 1.2346 · grad_norm 0.5000 · learning_rate 1.00e-04 · 500 tok/s · "
        "elapsed 0:00:04, ETA 0:00:16",
        "eval at step 2/10 (0:00:03): eval_loss 2.0000 · eval_ppl 7.3890",
        "training done: 10 steps in 0:01:05 · train_loss 1.5000",
    ]



def test_summary_says_stopped_when_training_ended_before_its_last_step(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmtune")
    state = TrainerState(max_steps=10, global_step=4, epoch=0.4)
    LogLinesCallback().on_log(training_args(tmp_path), state, TrainerControl(),
                              logs={"train_runtime": 30.0, "train_loss": 2.25, "epoch": 0.4})
    lines = [r.getMessage() for r in caplog.records if r.name == "lmtune.train.progress"]
    assert lines == ["training stopped at step 4/10 in 0:00:30 · train_loss 2.2500"]

def test_log_lines_measure_tokens_per_second_since_the_last_line_without_eval_time(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="lmtune")
    args, control = training_args(tmp_path), TrainerControl()
    state = TrainerState(max_steps=4, global_step=0, num_input_tokens_seen=0)
    callback = LogLinesCallback()
    callback.on_train_begin(args, state, control)
    clock.now += 2.0
    state.global_step, state.num_input_tokens_seen = 2, 1000
    callback.on_log(args, state, control, logs={"loss": 1.0})
    clock.now += 50.0  # a long evaluation: not training time
    callback.on_evaluate(args, state, control)
    clock.now += 1.0
    state.global_step, state.num_input_tokens_seen = 4, 1300
    callback.on_log(args, state, control, logs={"loss": 0.9})
    rates = [re.search(r"(\d+) tok/s", r.getMessage()).group(1) for r in caplog.records if "tok/s" in r.getMessage()]
    assert rates == ["500", "300"]


def test_only_the_main_process_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmtune")
    state = TrainerState(max_steps=4, global_step=1)
    state.is_world_process_zero = False
    LogLinesCallback().on_log(training_args(tmp_path), state, TrainerControl(), logs={"loss": 1.0})
    assert not [r for r in caplog.records if r.name == "lmtune.train.progress"]


def test_progress_bar_carries_loss_lr_and_tokens_per_second(tmp_path, clock, capsys):
    args, control = training_args(tmp_path), TrainerControl()
    state = TrainerState(max_steps=10, global_step=0, num_input_tokens_seen=0)
    callback = ProgressBarCallback()
    callback.on_train_begin(args, state, control)
    clock.now += 2.0
    state.global_step, state.num_input_tokens_seen = 2, 900
    callback.on_step_end(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 0.5, "learning_rate": 2e-4, "epoch": 0.1})
    assert callback.training_bar.n == 2
    assert callback.training_bar.postfix == "loss=0.5000, lr=2.00e-04, tok/s=450"
    callback.on_log(args, state, control, logs={"eval_loss": 0.7, "eval_runtime": 1.0})
    callback.on_train_end(args, state, control)
    assert "eval at step 2/10 (0:00:01): eval_loss 0.7000" in capsys.readouterr().out  # tqdm.write, above the bar


def tiny_trainer(tmp_path, tokenizer, **overrides) -> Trainer:
    from tests.conftest import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    return Trainer(model=model, args=training_args(tmp_path, **overrides))


@pytest.mark.parametrize(("disable_tqdm", "tty", "expected"), [
    (True, True, LogLinesCallback), (False, False, LogLinesCallback), (False, True, ProgressBarCallback),
])
def test_install_progress_picks_one_display(tmp_path, tokenizer, monkeypatch, disable_tqdm, tty, expected):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty, raising=False)
    trainer = tiny_trainer(tmp_path, tokenizer, disable_tqdm=disable_tqdm)
    installed = install_progress(trainer)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert isinstance(installed, expected) and kinds.count(expected) == 1
    assert PrinterCallback not in kinds and ProgressCallback not in kinds
    assert trainer.args.include_num_input_tokens_seen == "non_padding"


def test_install_progress_keeps_a_users_token_count_choice(tmp_path, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="lmtune")
    trainer = tiny_trainer(tmp_path, tokenizer, include_num_input_tokens_seen="all")
    install_progress(trainer)
    assert trainer.args.include_num_input_tokens_seen == "all"
    assert "tok/s = input tokens per second, padding included" in caplog.text


def test_report_to_names_a_missing_or_unknown_backend():
    check_report_to(["tensorboard"])
    check_report_to("none")
    with pytest.raises(ConfigError, match=r"--report_to tensorbord: unknown backend \(did you mean tensorboard\?\)"):
        check_report_to(["tensorbord"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="--report_to wandb: its package is not installed; pip install wandb"):
            check_report_to(["wandb"])


class AppHandler(logging.StreamHandler):
    """A handler some application installed."""


def test_library_deprecations_are_silenced_and_each_warning_shows_once():
    console = io.StringIO()
    handler = logging.StreamHandler(console)  # the kind logging.basicConfig installs
    foreign = AppHandler(io.StringIO())  # an application's own handler: left alone
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(foreign)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure_messages(interactive=True)
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("something the user should see", FutureWarning)
        assert [str(w.message) for w in caught] == ["something the user should see"]
        assert any(isinstance(f, OnceFilter) for f in handler.filters)
        log = logging.getLogger("lmtune.test_once")
        log.setLevel(logging.INFO)
        for _ in range(3):
            log.warning("same warning %d", 1)
        log.warning("another warning")
        log.info("info repeats")
        log.info("info repeats")
        # DeepSpeed's logger (with its own handler) drops its CPU-fallback notice, nothing else.
        deepspeed = logging.getLogger("DeepSpeed")
        notice = logging.makeLogRecord({"msg": "Setting accelerator to CPU. If you have GPU or other accelerator, "
                                               "we were unable to detect it.", "levelno": logging.WARNING})
        assert not deepspeed.filter(notice)
        assert deepspeed.filter(logging.makeLogRecord({"msg": "ZeRO stage 3 needs a config"}))
    finally:
        root.removeHandler(handler)
        root.removeHandler(foreign)
    seen = console.getvalue().splitlines()
    assert [m for m in seen if "warning" in m] == ["same warning 1", "another warning"]
    assert seen.count("info repeats") == 2
    assert not foreign.filters and foreign.stream.getvalue().count("same warning 1") == 3


@pytest.fixture
def one_thread():
    # Tiny models run fastest on one thread, above all on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_real_run_logs_lines_and_tensorboard_scalars(tiny_llama_dir, alpaca_file, tmp_path, caplog, capsys,
                                                       one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO, logger="lmtune")
    out = tmp_path / "out"
    finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(out),
             do_train=True, do_eval=True, validation_split_percentage=20, max_steps=4, logging_steps=2,
             eval_strategy="steps", eval_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
             max_seq_length=128, save_strategy="no", report_to="tensorboard", disable_tqdm=True, use_cpu=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lmtune.train.progress"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" (")[0] for s in steps] == ["step 2/4", "step 4/4"]  # --logging_steps 2 honoured
    assert all(re.search(r"loss \d+\.\d{4} .* learning_rate .* tok/s .* ETA", s) for s in steps)
    assert any(line.startswith("eval at step 2/4") and "eval_loss" in line for line in lines)
    printed = capsys.readouterr()
    assert "{'loss'" not in printed.out + printed.err  # no raw dicts from the stock PrinterCallback
    assert "it/s]" not in printed.err  # no tqdm bar when not on a terminal

    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event files under output_dir/runs"
    scalars: dict[str, list[int]] = {}
    for file in events:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.step for e in accumulator.Scalars(tag))
    assert scalars["train/loss"] == [2, 4]
    assert 2 in scalars["eval/loss"] and 4 in scalars["eval/loss"]
    assert "train/num_input_tokens_seen" in scalars
    assert (out / "README.md").read_text().count("## How to use") == 1  # our card replaced PEFT's
