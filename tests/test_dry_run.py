"""``--dry_run``: the data report, measured on the prepared data, with no weights loaded and nothing written."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import datasets
import pytest

from lmtune.cli import main
from lmtune.data.formats import alpaca_prompt
from lmtune.data.render import IGNORE_INDEX, RenderStats
from lmtune.data.report import build_data_report, estimate_steps, format_data_report, mark_supervised
from lmtune.errors import DataFormatError
from lmtune.finetuning import finetune


@pytest.fixture
def config_only_model(tiny_llama_dir, tmp_path):
    """The tiny model's config and tokenizer without its weights: a dry run must not need them."""
    path = tmp_path / "config-only"
    path.mkdir()
    for file in tiny_llama_dir.iterdir():
        if not file.name.endswith((".safetensors", ".bin")):
            shutil.copy(file, path / file.name)
    return path


def sample_lengths(tokenizer, records) -> list[int]:
    """Tokens of each Alpaca record as training renders it (BOS + prompt + response + EOS), computed here."""
    return [len(tokenizer(alpaca_prompt(r["instruction"], r["input"]) + r["output"]).input_ids) + 1 for r in records]


def test_dry_run_reports_the_data_and_loads_no_weights(config_only_model, alpaca_file, demo_records, tokenizer,
                                                       tmp_path, capsys):
    records = demo_records[:40]
    lengths = sample_lengths(tokenizer, records)
    limit = max(lengths[0], sorted(lengths)[len(lengths) // 2])  # record 0 fits, the longer half is cut
    cut = [n - limit for n in lengths if n > limit]
    assert cut, "the fixture data must have samples longer than the limit"
    kept = [min(n, limit) for n in lengths]
    out = tmp_path / "out"

    code = main(["finetune", "--model_name_or_path", str(config_only_model), "--train_file", str(alpaca_file),
                 "--output_dir", str(out), "--do_train", "--dry_run", "--max_seq_length", str(limit),
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                 "--num_train_epochs", "3", "--report_to", "none"])

    text = capsys.readouterr().out
    assert code == 0
    assert not out.exists()  # nothing written: no adapter, no arguments file
    assert "records     40 read, 40 kept, none dropped" in text
    median = statistics.median(kept)
    median_text = f"{median:.0f}" if float(median).is_integer() else f"{median:.1f}"
    assert (f"tokens      {sum(kept)} in all; per sample min {min(kept)}, median {median_text}, max {max(kept)}"
            in text)
    assert (f"truncated   {len(cut)} sample(s) longer than --max_seq_length {limit}, {sum(cut)} tokens cut "
            f"(at most {max(cut)} from one sample)") in text
    assert "EOS         supervised in every sample" in text
    assert "packing     off" in text
    # 40 samples / 4 per batch = 10 batches; 2 accumulated per step = 5 steps per epoch; 3 epochs.
    assert "40 rows / global batch 8 = 5 optimizer steps per epoch; 3 epochs = 15 steps" in text
    # The first record decoded: prompt plain, response and EOS supervised.
    first = records[0]
    assert f"{alpaca_prompt(first['instruction'], first['input'])}[[{first['output']}</s>]]" in text
    supervised = int(re.search(r"supervised  (\d+) tokens", text).group(1))
    assert 0 < supervised < sum(kept)


def test_dry_run_with_packing_reports_rows_and_efficiency(config_only_model, alpaca_file, tmp_path, capsys):
    metrics = finetune(model_name_or_path=str(config_only_model), train_file=str(alpaca_file),
                       output_dir=str(tmp_path / "out"), do_train=True, do_eval=True, validation_split_percentage=25,
                       dataset_concatenation=True, max_seq_length=256, per_device_train_batch_size=2,
                       max_steps=7, dry_run=True, report_to="none")
    text = capsys.readouterr().out
    rows, tokens = metrics["dry_run_train_rows"], metrics["dry_run_train_tokens"]
    assert rows < metrics["dry_run_train_kept"] == 30
    assert metrics["dry_run_validation_kept"] == 10
    assert metrics["dry_run_train_packing_efficiency"] == pytest.approx(tokens / (rows * 256))
    assert f"30 samples in {rows} rows of 256 tokens: {tokens / (rows * 256):.1%} of row slots" in text
    assert metrics["dry_run_steps"] == 7
    per_epoch = -(-rows // 2)
    assert f"= {per_epoch} optimizer steps per epoch; --max_steps 7 = {7 / per_epoch:.2f} epochs" in text
    assert "validation data:" in text and "(25% held out)" in text


def test_dry_run_leaves_a_full_output_dir_untouched(config_only_model, alpaca_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    finetune(model_name_or_path=str(config_only_model), train_file=str(alpaca_file), output_dir=str(out),
             do_train=True, dry_run=True, overwrite_output_dir=True, report_to="none")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert "lmtune dry run" in capsys.readouterr().out


def test_dry_run_respects_log_level(config_only_model, alpaca_file, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    finetune(model_name_or_path=str(config_only_model), train_file=str(alpaca_file), output_dir=str(tmp_path / "o"),
             do_train=True, dry_run=True, log_level="warning", report_to="none")
    assert not [r for r in caplog.records if r.name.startswith("lmtune") and r.levelname == "INFO"]
    assert "records     40 read" in capsys.readouterr().out  # the report itself is the command's output


def test_dry_run_without_do_train_reports_the_training_data(config_only_model, alpaca_file, tmp_path):
    """The reference's command lines without --do_train: a bare --dry_run shows what training would see."""
    metrics = finetune(model_name_or_path=str(config_only_model), train_file=str(alpaca_file),
                       output_dir=str(tmp_path / "o"), dry_run=True, report_to="none")
    assert metrics["dry_run_train_records"] == 40 and metrics["dry_run_steps"] > 0
    assert not any(key.startswith("dry_run_validation") for key in metrics)
    eval_only = finetune(model_name_or_path=str(config_only_model), validation_file=str(alpaca_file),
                         output_dir=str(tmp_path / "o"), dry_run=True, do_eval=True, report_to="none")
    assert eval_only["dry_run_validation_records"] == 40 and "dry_run_train_records" not in eval_only


# --- the report on hand-made prepared data ------------------------------------------------------------


def report_for(tokenizer, rows: dict[str, list], **kwargs):
    stats = RenderStats(kept=len(rows["input_ids"]))
    return build_data_report(tokenizer, train=datasets.Dataset.from_dict(rows), validation=None,
                             stats={"train": stats}, packing=None, sources={"train": "rows.json"},
                             max_seq_length=16, **kwargs)


def test_a_sample_without_supervised_tokens_fails(tokenizer):
    rows = {"input_ids": [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2]],
            "labels": [[-100, -100, 6, 2], [-100, -100, -100], [-100, 8, 9, 2]]}
    with pytest.raises(DataFormatError, match=r"train sample 1 \(row 1\) has no supervised tokens .*1 sample\(s\)"):
        report_for(tokenizer, rows)


def test_no_supervised_tokens_at_all_fails(tokenizer):
    rows = {"input_ids": [[1, 5, 2], [1, 7, 2]], "labels": [[IGNORE_INDEX] * 3, [IGNORE_INDEX] * 3]}
    with pytest.raises(DataFormatError, match="no supervised tokens at all"):
        report_for(tokenizer, rows)


def test_a_packed_row_is_checked_sample_by_sample(tokenizer):
    # Row 0 packs two samples (positions restart at 0); the second has no supervised token.
    rows = {"input_ids": [[1, 5, 2, 1, 6, 2]], "labels": [[-100, 5, 2, -100, -100, -100]],
            "position_ids": [[0, 1, 2, 0, 1, 2]]}
    with pytest.raises(DataFormatError, match=r"train sample 1 \(row 0\)"):
        report_for(tokenizer, rows)


def test_report_counts_unsupervised_eos_and_supervised_share(tokenizer):
    eos = tokenizer.eos_token_id
    rows = {"input_ids": [[1, 40, 41, eos], [1, 42, 43, 44, eos]],
            "labels": [[-100, -100, 41, eos], [-100, -100, 43, 44, -100]]}
    report = report_for(tokenizer, rows)
    train = report.splits[0]
    assert (train.tokens, train.supervised_tokens, train.eos_supervised) == (9, 4, 1)
    assert (train.min_tokens, train.median_tokens, train.max_tokens) == (4, 4.5, 5)
    text = format_data_report(report)
    assert "EOS         supervised in 1 of 2 samples" in text
    assert "supervised  4 tokens, 44.4% of all" in text


def test_seq2seq_report_describes_sources_and_targets(tokenizer):
    eos = tokenizer.eos_token_id
    rows = {"input_ids": [[40, 41, 42, eos], [43, 44, eos]], "labels": [[50, eos], [51, 52, 53, eos]]}
    report = report_for(tokenizer, rows, seq2seq=True, max_source_length=8, max_target_length=4)
    train = report.splits[0]
    assert (train.tokens, train.supervised_tokens, train.eos_supervised) == (13, 6, 2)
    assert (train.min_target_tokens, train.max_target_tokens) == (2, 4)
    text = format_data_report(report)
    assert "source per sample min 3, median 3.5, max 4; target min 2, median 3, max 4" in text
    assert "truncated   none (every sample fits --max_target_length 4)" in text
    assert "packing" not in text
    first = tokenizer.decode([40, 41, 42, eos])
    assert f"source (encoder input):\n{first}\ntarget (decoder labels):\n[[{tokenizer.decode([50, eos])}]]" in text


def test_mark_supervised_brackets_each_supervised_span(tokenizer):
    prompt, response = "Say hi.\n", "hi there"
    ids = tokenizer(prompt + response).input_ids
    boundary = len(tokenizer(prompt).input_ids)
    labels = [IGNORE_INDEX] * boundary + ids[boundary:]
    assert mark_supervised(tokenizer, ids, labels) == f"<s>{prompt}[[{response}]]"


@pytest.mark.parametrize(
    ("rows", "settings", "per_epoch", "total"),
    [
        (10, dict(per_device_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=3), 2, 6),
        (10, dict(per_device_batch_size=4, world_size=2, num_train_epochs=1), 2, 2),  # 3 batches over 2 processes
        (10, dict(per_device_batch_size=4, drop_last=True, num_train_epochs=2), 2, 4),
        (10, dict(per_device_batch_size=4, max_steps=7), 3, 7),
        (3, dict(per_device_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=1.5), 1, 2),
    ],
)
def test_estimate_steps_counts_like_the_trainer(rows, settings, per_epoch, total):
    steps = estimate_steps(rows, **settings)
    assert (steps.steps_per_epoch, steps.total_steps) == (per_epoch, total)


def test_dry_run_metrics_are_json_ready(config_only_model, alpaca_file, tmp_path, capsys):
    metrics = finetune(model_name_or_path=str(config_only_model), train_file=str(alpaca_file),
                       output_dir=str(tmp_path / "o"), do_train=True, dry_run=True, report_to="none")
    assert json.loads(json.dumps(metrics))["dry_run_train_kept"] == 40
    capsys.readouterr()
