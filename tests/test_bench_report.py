"""The benchmark's accounting (bench/report.py): model FLOPs match the model, ratios say met or missed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.assets import MODEL_PRESETS
from bench.report import goal_lines, matmul_params, ratios_line, step_flops


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


def _row(name, wall, loss=2.0, rss=1000.0, compute="fp32", setup=5.0, share=0.5):
    return {"name": name, "wall_s": wall, "cpu_s": wall * 2, "tokens_per_s": 1000 / wall, "train_loss": loss,
            "peak_rss_mb": rss, "compute": compute, "setup_s": setup, "share_bf16": share, "share_fp32": share}


def test_ratios_line_compares_each_lmtune_variant_with_every_other_program():
    rows = [_row("ref-concat", 30.0), _row("trl", 15.0), _row("lmtune", 10.0, loss=1.9, rss=1200),
            _row("lmtune-ckpt", 12.0, rss=900)]
    lines = ratios_line(rows).splitlines()
    assert lines[0] == (
        "ratios (lmtune): vs ref-concat: 3.00x epoch time, 3.00x CPU time, 3.00x tokens/s, loss 1.9000 vs 2.0000, "
        "peak RSS 1200 vs 1000 MB; vs trl: 1.50x epoch time, 1.50x CPU time, 1.50x tokens/s, "
        "loss 1.9000 vs 2.0000, peak RSS 1200 vs 1000 MB"
    )
    assert lines[1].startswith("ratios (lmtune-ckpt): vs ref-concat: 2.50x epoch time")
    assert ratios_line([_row("ref-concat", 30.0)]) == "ratios: no lmtune run beside another program"


def test_goal_lines_judge_the_fastest_usable_peer_and_leave_out_emulated_bf16():
    rows = [_row("ref-concat", 300.0, compute="bf16", setup=4.5), _row("ref-concat-fp32", 20.0, rss=2000),
            _row("trl-packed", 16.0), _row("lmtune", 10.0, loss=1.995, rss=1500, setup=5.0, share=0.85)]
    text = goal_lines(rows, bf16_units=False)
    assert "fastest peer (trl-packed, fp32) on epoch time: 1.60x (CPU time 1.60x), loss 1.9950 vs 2.0000: met" in text
    assert "peak RSS <= the reference's float32 run: 1500 vs 2000 MB: met" in text
    assert "5.0 vs 4.5 s: met" in text
    assert "not judged: this CPU has no AMX or AVX512-BF16" in text
    assert "80% of the fp32 ceiling: 85%: met" in text
    bf16_rows = [_row("ref-concat", 15.0, compute="bf16"), _row("lmtune", 10.0, compute="bf16", setup=7.0)]
    text = goal_lines(bf16_rows, bf16_units=True)
    assert "fastest peer (ref-concat, bf16) on epoch time: 1.50x (CPU time 1.50x), loss 2.0000 vs 2.0000: met" in text
    assert "7.0 vs 5.0 s: missed" in text
    assert "2x the reference's bf16 fast path (ref-concat): 1.50x: missed" in text


def test_on_a_bf16_cpu_the_float32_goal_is_judged_from_lmtunes_float32_run():
    rows = [_row("ref-concat", 15.0, compute="bf16"), _row("ref-concat-fp32", 30.0), _row("trl-packed", 40.0),
            _row("lmtune", 10.0, compute="bf16"), _row("lmtune-fp32", 21.0, loss=1.99)]
    text = goal_lines(rows, bf16_units=True)
    assert ("goal (float32 path, as without bf16 units): lmtune-fp32 >= 1.5x the fastest float32 peer "
            "(ref-concat-fp32): 1.43x, loss 1.9900 vs 2.0000: missed") in text
    assert "lmtune-fp32" not in goal_lines(rows, bf16_units=False)  # there the first goal judges it directly
    assert "vs lmtune-fp32" not in ratios_line(rows)
