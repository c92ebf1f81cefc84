"""The benchmark's accounting (bench/report.py): model FLOPs match the model, ratios say met or missed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.assets import MODEL_PRESETS
from bench.report import matmul_params, ratios_line, step_flops


@pytest.mark.parametrize("preset", ["llama-134m", "gemma-like-256k"])
def test_matmul_parameters_are_the_models_linear_weights(preset):
    config = dict(MODEL_PRESETS[preset])
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(config) == linear  # a tied head is one weight, multiplied once per token
    if preset == "llama-134m":
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.1e6, rel=1e-3)


def test_step_flops_count_lora_as_four_and_full_as_six_per_parameter_plus_attention():
    config = dict(MODEL_PRESETS["llama-134m"])
    attention = 6 * 12 * 768 * 512 * 512 * 4
    assert step_flops(config, 4, 512) == 4 * matmul_params(config) * 4 * 512 + attention
    assert step_flops(config, 4, 512, lora=False) == 6 * matmul_params(config) * 4 * 512 + attention


def _row(name, wall, loss=2.0, rss=1000.0):
    return {"name": name, "wall_s": wall, "tokens_per_s": 1000 / wall, "train_loss": loss, "peak_rss_mb": rss}


def test_ratios_line_reports_each_goal_as_met_or_missed():
    rows = [_row("ref-concat", 30.0), _row("ref-pad", 35.0), _row("lmtune", 10.0, loss=1.9, rss=1200),
            _row("lmtune-ckpt", 12.0, rss=900)]
    lines = ratios_line(rows).splitlines()
    assert lines[0] == (
        "ratios (lmtune): vs ref-concat: 3.00x epoch time (goal >= 2: met), 3.00x tokens/s, loss 1.9000 vs 2.0000, "
        "peak RSS 1200 vs 1000 MB; vs ref-pad: 3.50x epoch time (goal >= 4: missed), 3.50x tokens/s, "
        "loss 1.9000 vs 2.0000, peak RSS 1200 vs 1000 MB"
    )
    assert lines[1].startswith("ratios (lmtune-ckpt): vs ref-concat: 2.50x epoch time (goal >= 2: met)")
    assert ratios_line([_row("ref-concat", 30.0)]) == "ratios: no lmtune run"
