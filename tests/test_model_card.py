"""The end of a run: model card README.md and loss-curve PNG, written from the run's own files."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from matplotlib.image import imread
from transformers import AutoModelForCausalLM

from lmtune.args import args_to_dict, parse_args
from lmtune.errors import ConfigError
from lmtune.export.model_card import write_model_card, write_run_summary
from lmtune.export.plots import loss_points, plot_loss_curve
from lmtune.finetuning import finetune
from lmtune.run_record import write_run_args

LOG_HISTORY = [
    {"loss": 2.5, "learning_rate": 2e-4, "epoch": 0.3, "step": 10},
    {"eval_loss": 2.4, "eval_ppl": 11.02, "epoch": 0.3, "step": 10},
    {"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.6, "step": 20},
    {"loss": 1.6, "learning_rate": 0.0, "epoch": 1.0, "step": 30},
    {"eval_loss": 1.5, "eval_ppl": 4.48, "epoch": 1.0, "step": 30},
    {"train_loss": 2.03, "train_runtime": 12.5, "total_flos": 1.0, "epoch": 1.0, "step": 30},
    {"eval_loss": 1.5, "eval_ppl": 4.48, "epoch": 1.0, "step": 30},  # the evaluation after training
]


def fake_run(tmp_path, *flags: str):
    """An output_dir as a finished LoRA run leaves it (arguments, state, results, adapter config, PEFT's card)."""
    out = tmp_path / "my-run"
    args = parse_args(["--model_name_or_path", "org/base-7b", "--train_file", "data/alpaca.json",
                       "--output_dir", str(out), "--do_train", "--do_eval", "--validation_split_percentage", "10",
                       "--learning_rate", "2e-4", "--max_steps", "30", "--lora_rank", "16", "--use_cpu", *flags])
    write_run_args(str(out), args_to_dict(args))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 30, "max_steps": 30, "epoch": 1.0,
                                                        "log_history": LOG_HISTORY[:-1]}))
    (out / "all_results.json").write_text(json.dumps({"train_loss": 2.03, "train_samples": 90, "eval_loss": 1.5,
                                                      "eval_ppl": 4.48, "eval_samples": 10, "eval_runtime": 0.4}))
    if "--full_finetune" not in flags:
        (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16,
                                                             "lora_dropout": 0.05, "target_modules": ["v_proj",
                                                                                                      "q_proj"]}))
    (out / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")  # PEFT's template
    return out


def test_loss_points_take_logged_losses_and_skip_the_summary():
    points = loss_points(LOG_HISTORY)
    assert points == {"train": [(10, 2.5), (20, 2.0), (30, 1.6)], "eval": [(10, 2.4), (30, 1.5)]}


def test_run_summary_writes_the_card_over_peft_template_and_the_plot(tmp_path):
    out = fake_run(tmp_path)
    card = write_run_summary(out, LOG_HISTORY, world_size=2).read_text()
    assert "[More Information Needed]" not in card
    assert card.startswith("---\nbase_model: org/base-7b\nlibrary_name: peft\n")
    assert "A LoRA adapter for `org/base-7b`" in card and "for the `completion` task" in card
    assert "- training: `data/alpaca.json`, 90 samples" in card
    assert "- validation: 10% held out of the training data, 10 samples" in card
    for row in ("| r | 16 |", "| target_modules | q_proj, v_proj |", "| learning_rate | 0.0002 |",
                "| max_steps | 30 |", "| processes | 2 |", "| global batch size | 16 |",
                "| eval_loss | 1.5 |", "| eval_ppl | 4.48 |", "| train_loss | 2.03 |"):
        assert row in card, row
    assert "Trained 30 of 30 optimizer steps (1.00 epochs)." in card
    assert "![train and eval loss against optimizer steps](loss_curve.png)" in card
    assert f'model = PeftModel.from_pretrained(base, "{out}")' in card
    assert f"lmtune chat --model_name_or_path org/base-7b --adapter {out}" in card
    assert re.search(r"\| transformers \| 5\.\d+", card) and "| peft |" in card

    image = imread(out / "loss_curve.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert np.std(image[..., :3]) > 0.05  # lines drawn, not a blank canvas


def test_an_adapter_of_a_gguf_base_loads_the_base_as_transformers_reads_gguf(tmp_path):
    out = fake_run(tmp_path)
    args_file = out / "lmtune_args.json"
    args = json.loads(args_file.read_text())
    args["args"]["model"]["model_name_or_path"] = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    args_file.write_text(json.dumps(args))
    card = write_model_card(out).read_text()
    assert ('base = AutoModelForCausalLM.from_pretrained("/models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")'
            in card)
    assert f"lmtune chat --model_name_or_path /models/SmolLM2-135M-Instruct.Q4_1.gguf --adapter {out}" in card


def test_full_finetune_card_loads_the_output_dir_itself(tmp_path):
    out = fake_run(tmp_path, "--full_finetune")
    card = write_model_card(out).read_text()
    assert "library_name: transformers" in card and "A full fine-tune for `org/base-7b`" in card
    assert f'model = AutoModelForCausalLM.from_pretrained("{out}")' in card
    assert f"lmtune chat --model_name_or_path {out}\n" in card and "PeftModel" not in card


def test_card_needs_an_lmtune_run(tmp_path):
    with pytest.raises(ConfigError, match="holds no lmtune_args.json"):
        write_model_card(tmp_path)


def test_no_logged_loss_means_no_plot_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert plot_loss_curve([{"train_loss": 1.0, "step": 3}], tmp_path) is None
    assert "lower --logging_steps" in caplog.text and not (tmp_path / "loss_curve.png").exists()


def test_a_real_runs_card_tells_how_to_load_the_adapter_and_it_works(tiny_llama_dir, alpaca_file, tmp_path, capsys,
                                                                      one_torch_thread):
    out = tmp_path / "out"
    finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(out),
             do_train=True, max_steps=2, logging_steps=1, per_device_train_batch_size=4, max_seq_length=96,
             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, lora_rank=4)
    card = (out / "README.md").read_text()
    assert "Trained 2 of 2 optimizer steps" in card and "| train_loss |" in card
    assert (out / "loss_curve.png").is_file() and (out / "lmtune_args.json").is_file()
    # Run the card's own Python snippet: it must load the trained adapter.
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - our own generated snippet
    model, tokenizer = scope["model"], scope["tokenizer"]
    assert type(model).__name__ == "PeftModelForCausalLM"
    ids = tokenizer("hello", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert model(ids).logits.shape == base(ids).logits.shape
    capsys.readouterr()
