"""The CPU bf16 check: flag parsing, the decision, the notice, and what a run does with it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import lmtune.run_setup as run_setup
from lmtune.args import parse_args
from lmtune.cli import main_clm
from lmtune.model.upcast import UpcastLinear, upcast_compute
from lmtune.train.cpu import (
    Bf16Check,
    bf16_units,
    check_bf16,
    cpu_flags,
    matmul_gflops,
    read_cpuinfo,
)
from tests.conftest import tiny_llama_config

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""
EPYC_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx fma f16c avx2 sha_ni vaes vpclmulqdq
"""
# AMD EPYC Genoa (Zen 4, family 25 model 17) under KVM: AVX512-BF16, no AMX.
EPYC_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512_vbmi2
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve i8mm bf16
"""


def test_flags_come_from_the_first_processor_only():
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert "sse2" in cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags(EPYC_ZEN3) >= {"avx2", "fma"}
    assert cpu_flags("") == set() and cpu_flags("model name : x\n") == set()


@pytest.mark.parametrize(
    ("text", "units"),
    [(SAPPHIRE_RAPIDS, ("amx_bf16", "avx512_bf16")), (EPYC_ZEN3, ()), (GRAVITON3, ("bf16",))],
)
def test_bf16_units_are_named_best_first(text, units):
    assert bf16_units(cpu_flags(text)) == units


def test_read_cpuinfo_of_a_missing_file_is_empty(tmp_path):
    assert read_cpuinfo(tmp_path / "absent") == ""


def test_without_measuring_the_flags_decide():
    assert check_bf16(SAPPHIRE_RAPIDS, measure=False) == Bf16Check(("amx_bf16", "avx512_bf16"))
    assert check_bf16(SAPPHIRE_RAPIDS, measure=False).helps
    assert not check_bf16(EPYC_ZEN3, measure=False).helps
    assert check_bf16(EPYC_ZEN3, measure=False).speedup is None


def test_zen4_with_avx512_bf16_keeps_bf16_both_by_flags_and_by_its_measured_rates():
    assert check_bf16(EPYC_ZEN4, measure=False) == Bf16Check(("avx512_bf16",))
    assert check_bf16(EPYC_ZEN4, measure=False).helps
    # Rates measured on that machine (bench/README.md): bf16 2-3x float32, so --bf16 stays and is suggested.
    measured = Bf16Check(("avx512_bf16",), bf16_gflops=150.5, fp32_gflops=76.4)
    assert measured.helps and measured.notice(requested=True) is None
    assert measured.notice(requested=False).endswith("(1.97x): pass --bf16 True to train faster.")


def test_a_measurement_overrides_the_flags():
    # A VM can hide the flags (or a build lack the kernels): the stopwatch has the last word.
    assert Bf16Check((), bf16_gflops=30.0, fp32_gflops=10.0).helps
    assert not Bf16Check(("amx_bf16",), bf16_gflops=5.0, fp32_gflops=10.0).helps
    assert Bf16Check((), bf16_gflops=5.0, fp32_gflops=10.0).speedup == pytest.approx(0.5)


def test_notice_when_bf16_would_not_help():
    check = Bf16Check((), bf16_gflops=0.7, fp32_gflops=21.0)
    assert check.notice(requested=True) == (
        "--bf16 would not help here: this CPU has no bf16 matrix instructions (no amx_bf16 or avx512_bf16 in "
        "/proc/cpuinfo), and measured bf16 matrix multiplies at 0.7 GFLOP/s against 21.0 GFLOP/s in float32 "
        "(0.03x). Computing in float32 instead, which is faster on this CPU and at least as accurate; frozen "
        "weights stay in bf16, activations take twice the memory (add --activation_checkpointing True if memory "
        "is short). bf16 pays on CPUs with AMX (Xeon 4th gen and later) or AVX512-BF16."
    )
    assert check.notice(requested=False) is None


def test_notice_names_present_flags_that_do_not_pay():
    notice = Bf16Check(("avx512_bf16",), bf16_gflops=8.0, fp32_gflops=10.0).notice(requested=True)
    assert notice.startswith("--bf16 would not help here: this CPU has avx512_bf16, and measured bf16")
    assert "(0.80x)" in notice


def test_hint_to_pass_bf16_only_when_it_clearly_pays():
    fast = Bf16Check(("amx_bf16",), bf16_gflops=400.0, fp32_gflops=100.0)
    assert fast.notice(requested=False) == (
        "this CPU has amx_bf16 and measured bf16 matrix multiplies at 400.0 GFLOP/s against 100.0 GFLOP/s "
        "in float32 (4.00x): pass --bf16 True to train faster."
    )
    assert fast.notice(requested=True) is None
    assert Bf16Check(("amx_bf16",), bf16_gflops=120.0, fp32_gflops=100.0).notice(requested=False) is None
    assert Bf16Check(("amx_bf16",)).notice(requested=False) is None  # flags alone: no numbers to cite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_gflops_measures_a_positive_rate(dtype):
    assert matmul_gflops(dtype, m=16, k=32, n=32, seconds=0.0) > 0


def test_the_measured_check_on_this_machine_is_consistent():
    check = check_bf16(seconds=0.0)
    assert check.bf16_gflops > 0 and check.fp32_gflops > 0
    assert check.helps == (check.speedup >= 1.0)
    assert check.units == bf16_units(cpu_flags(read_cpuinfo()))


# --- what a run does with the check -------------------------------------------------------------

SLOW_BF16 = Bf16Check((), bf16_gflops=1.0, fp32_gflops=20.0)
FAST_BF16 = Bf16Check(("amx_bf16",), bf16_gflops=80.0, fp32_gflops=20.0)


def _cpu_args(tmp_path, *extra):
    argv = ["--model_name_or_path", "unused", "--train_file", "unused.json", "--output_dir", str(tmp_path),
            "--do_train", "--use_cpu", "True", *extra]
    return parse_args(argv)


@pytest.mark.parametrize(("check", "requested", "kept"), [
    (SLOW_BF16, True, False), (FAST_BF16, True, True), (SLOW_BF16, False, False), (FAST_BF16, False, False),
])
def test_run_keeps_bf16_only_where_it_pays(tmp_path, monkeypatch, caplog, check, requested, kept):
    monkeypatch.setattr(run_setup, "check_bf16", lambda measure=True: check)
    args = _cpu_args(tmp_path, *(["--bf16", "True"] if requested else []))
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        args, bf16_storage = run_setup.check_cpu_bf16(args)
    assert args.training.bf16 is kept
    assert bf16_storage is (requested and not kept)  # asked for bf16, computing in float32: weights stay bf16
    notice = check.notice(requested=requested)
    assert (notice in caplog.text) if notice else ("bf16" not in caplog.text)


def test_finetune_with_bf16_on_a_cpu_without_it_trains_in_float32(tiny_llama_dir, alpaca_file, tmp_path,
                                                                  monkeypatch, caplog):
    monkeypatch.setattr(run_setup, "check_bf16", lambda measure=True: SLOW_BF16)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        code = main_clm(["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(alpaca_file),
                         "--output_dir", str(out), "--do_train", "--bf16", "True", "--max_steps", "2",
                         "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                         "--disable_tqdm", "True", "--no_cuda", "--dataset_concatenation"])
    assert code == 0
    assert "--bf16 would not help here" in caplog.text
    saved = json.loads((out / "lmtune_args.json").read_text())
    assert saved["args"]["training"]["bf16"] is False
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_full_finetuning_keeps_float32_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(run_setup, "check_bf16", lambda measure=True: SLOW_BF16)
    args, bf16_storage = run_setup.check_cpu_bf16(_cpu_args(tmp_path, "--bf16", "True", "--full_finetune"))
    assert args.training.bf16 is False and bf16_storage is False


# --- bf16 storage, float32 arithmetic -----------------------------------------------------------


def _twins(tied: bool):
    """A bf16-stored model made to compute in float32, and a float32 model with the same (rounded) weights."""
    torch.manual_seed(0)
    config = tiny_llama_config(97, tie_word_embeddings=tied)
    half = LlamaForCausalLM(config).to(torch.bfloat16)
    exact = LlamaForCausalLM(config)
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return upcast_compute(half), exact


@pytest.mark.parametrize("tied", [False, True])
def test_upcast_model_computes_what_float32_computes_and_keeps_bf16_weights(tied):
    half, exact = _twins(tied)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert half.model.norm.weight.dtype == torch.float32
    assert (half.lm_head.weight is half.model.embed_tokens.weight) is tied
    assert isinstance(half.model.layers[0].self_attn.q_proj, UpcastLinear)
    assert half.state_dict().keys() == exact.state_dict().keys()
    ids = torch.randint(0, 97, (2, 9))
    logits = half(ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact(ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_on_an_upcast_model_trains_float32_adapters_with_float32_gradients():
    half, exact = _twins(tied=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    half, exact = get_peft_model(half, config), get_peft_model(exact, config)
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ids = torch.randint(0, 97, (2, 9))
    grads = []
    for model in (half, exact):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_trainable_upcast_linear_still_gets_its_weight_gradient():
    upcast = upcast_compute(torch.nn.Sequential(torch.nn.Linear(4, 3).to(torch.bfloat16)))[0]
    assert isinstance(upcast, UpcastLinear) and upcast.weight.requires_grad
    x = torch.randn(2, 4, requires_grad=True)
    upcast(x).sum().backward()
    assert upcast.weight.grad is not None and upcast.weight.grad.dtype == torch.bfloat16
    assert x.grad.dtype == torch.float32


def test_linear_subclasses_compute_in_float32_too():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=False, multi_query=True, bias=False)
    half = FalconForCausalLM(config).to(torch.bfloat16)
    exact = FalconForCausalLM(config)
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    upcast_compute(half)
    dense = half.transformer.h[0].self_attention.dense  # FalconLinear, whose forward is its own
    assert type(dense).__name__ == "FalconLinear" and dense.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(half(ids).logits, exact(ids).logits, rtol=1e-5, atol=1e-5)


def test_console_scripts_freeze_the_garbage_collector_only_after_the_command(monkeypatch):
    import gc
    from pathlib import Path

    import tomllib

    from lmtune import cli

    events = []
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    assert cli._ends_the_process(lambda: events.append("command") or 3)() == 3
    assert events == ["command", "freeze"]
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lmtune": "lmtune.cli:script_main", "finetune_clm": "lmtune.cli:script_clm",
                       "finetune_seq2seq": "lmtune.cli:script_seq2seq", "finetune_dpo": "lmtune.cli:script_dpo"}


def test_launch_preloads_jemalloc_only_when_asked_and_not_given_an_allocator(tmp_path):
    from lmtune.train.cpu import allocator_preload

    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    found = (str(tmp_path / "absent.so"), str(lib))
    asked = {"LMTUNE_ALLOCATOR": "jemalloc"}
    assert allocator_preload(asked, found) == str(lib)
    assert allocator_preload({**asked, "LD_PRELOAD": "/opt/libfoo.so"}, found) == f"{lib}:/opt/libfoo.so"
    assert allocator_preload({**asked, "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, found) is None
    assert allocator_preload({}, found) is None  # the default: faster, if larger (bench/README.md)
    assert allocator_preload({"LMTUNE_ALLOCATOR": "system"}, found) is None
    assert allocator_preload(asked, (str(tmp_path / "absent.so"),)) is None


def test_launch_prints_and_passes_the_preload(monkeypatch, capsys, tmp_path):
    import subprocess

    from lmtune import launch

    seen = {}
    monkeypatch.setattr(launch, "allocator_preload", lambda env: "/x/libjemalloc.so.2")
    monkeypatch.setattr(subprocess, "run", lambda command, env, check: seen.update(env=env) or
                        subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert launch.main(["--world_size", "2", "finetune_clm", "--output_dir", str(tmp_path)]) == 0
    assert seen["env"]["LD_PRELOAD"] == "/x/libjemalloc.so.2"
    assert "LD_PRELOAD=/x/libjemalloc.so.2 " in capsys.readouterr().out
