"""Correct results at any scale: one global batch, however it is split, trains the same adapter.

The loss of an optimizer step is normalised by the supervised tokens of the whole step (all
micro-batches, all ranks): transformers' Trainer does it with ``num_items_in_batch`` and
``average_tokens_across_devices``. With SGD, no dropout, float32 and the same sample order,
``1 process x batch 8``, ``1 x batch 2 x 4 accumulation steps`` and ``2 processes x batch 4``
(torchrun, two torchrun "nodes" over loopback, mpirun with the reference's syntax, DeepSpeed
ZeRO-2 and ZeRO-3) must then save the same adapter, up to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main, main_clm

REPO_ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
# Relative difference of the learned LoRA weights; a per-micro-batch mean instead of the step's
# token-weighted mean moves them by ~10% on this data.
EXACT = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, demo_records) -> Path:
    path = tmp_path_factory.mktemp("ddp-data") / "train.json"
    path.write_text(json.dumps(demo_records[:40]), encoding="utf-8")
    return path


def flags(model_dir: Path, data: Path, out: Path, *, batch: int, accumulation: int = 1, packed: bool = False,
          cache: Path | None = None) -> list[str]:
    """Two SGD steps over the first 16 samples in file order (sequential sampling, no dropout)."""
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out),
        "--do_train", "--max_steps", "2", "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd", "--learning_rate", "0.5",
        "--lora_dropout", "0", "--train_sampling_strategy", "sequential", "--max_seq_length", "256",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
        "--seed", "0", "--no_cuda", *(["--dataset_concatenation"] if packed else []),
        *(["--dataset_cache_directory", str(cache)] if cache else []),
    ]  # fmt: skip


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(got: Path, expected: dict[str, torch.Tensor], tolerance: float = EXACT) -> None:
    weights = adapter(got)
    assert weights.keys() == expected.keys()
    for name, want in expected.items():
        assert weights[name].shape == want.shape, name
        # lora_B starts at zero, so it is all learned; lora_A barely moves from its random start.
        scale = want.abs().max().item()
        assert scale > 0, f"{name} did not train"
        difference = (weights[name].float() - want).abs().max().item() / scale
        assert difference < tolerance, f"{name}: relative difference {difference:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, train_file):
    """The single-process ``1 x batch 8`` adapters, unpacked and packed (computed once)."""
    def run(packed: bool) -> dict[str, torch.Tensor]:
        out = tmp_path_factory.mktemp("reference")
        assert main_clm(flags(tiny_llama_dir, train_file, out, batch=GLOBAL_BATCH, packed=packed)) == 0
        return adapter(out)

    return {False: run(False), True: run(True)}


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_accumulation_trains_the_same_adapter_as_one_big_batch(reference, tiny_llama_dir, train_file, tmp_path,
                                                                packed):
    out = tmp_path / "accumulated"
    assert main_clm(flags(tiny_llama_dir, train_file, out, batch=2, accumulation=4, packed=packed)) == 0
    assert_same_adapter(out, reference[packed])


def test_a_different_global_batch_trains_a_different_adapter(reference, tiny_llama_dir, train_file, tmp_path):
    # The comparison can fail: half the global batch moves the weights far beyond the tolerance.
    out = tmp_path / "half"
    assert main_clm(flags(tiny_llama_dir, train_file, out, batch=4)) == 0
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same_adapter(out, reference[False])


# --- real multi-process launches on this machine ---------------------------------------------

COUNTING_ENTRY = """
    import json, os, sys
    import lmtune.data.pipeline
    import lmtune.finetuning
    from lmtune.cli import main_clm

    tokenize, build_trainer, calls, trainers = (lmtune.data.pipeline.tokenize_segment_batch,
                                                lmtune.finetuning.build_trainer, [], [])

    def counted(*args, **kwargs):
        calls.append(1)
        return tokenize(*args, **kwargs)

    def kept(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    lmtune.data.pipeline.tokenize_segment_batch = counted  # the real function, counted per rank
    lmtune.finetuning.build_trainer = kept  # the real trainer, kept to read its DDP wrapper
    code = main_clm(sys.argv[1:])
    wrapper = trainers[0].model_wrapped
    with open(os.path.join(os.environ["COUNT_DIR"], f"rank{os.environ['RANK']}.json"), "w") as out:
        json.dump({"prepared": min(len(calls), 1), "wrapper": type(wrapper).__name__,
                   "find_unused": getattr(wrapper, "find_unused_parameters", None)}, out)
    sys.exit(code)
"""
# torch's DDP says this on the first step when find_unused_parameters=True found nothing unused.
FIND_UNUSED_WARNING = "find_unused_parameters=True was specified in DDP constructor"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch_env(monkeypatch):
    """Children import this checkout and choose their own threads; no launcher variables leak in."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def assert_rank_zero_reported(output: str) -> None:
    assert output.count("lmtune: training loss") == 1, output[-3000:]
    assert output.count("***** train metrics *****") == 1
    assert output.count("lmtune: step 2/2") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_adapter(reference, tiny_llama_dir, train_file, tmp_path, launch_env,
                                                       monkeypatch, capfd):
    entry = tmp_path / "counting_finetune_clm.py"
    entry.write_text(textwrap.dedent(COUNTING_ENTRY))
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["launch", "--world_size", "2", "--master_port", str(free_port()), str(entry),
                 *flags(tiny_llama_dir, train_file, out, batch=GLOBAL_BATCH // 2, cache=cache)])
    output = capfd.readouterr()
    assert code == 0, output.err[-3000:]
    assert_same_adapter(out, reference[False])
    assert_rank_zero_reported(output.out + output.err)
    # Rank 0 tokenized the data into the datasets cache; rank 1 read it there instead of tokenizing
    # again (a later run of the same job reads it too). Every LoRA parameter is used each step, so
    # DDP skips the per-step search for unused ones (transformers turns it on for any PeftModel).
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [
        {"prepared": 1, "wrapper": "DistributedDataParallel", "find_unused": False},
        {"prepared": 0, "wrapper": "DistributedDataParallel", "find_unused": False},
    ]
    assert FIND_UNUSED_WARNING not in output.out + output.err
    assert len(list((cache / "lmtune-rendered").glob("rendered-*.arrow"))) == 1
    assert (out / "train_results.json").is_file() and (out / "lmtune_args.json").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_torchrun_nodes_over_loopback_train_the_same_adapter(reference, tiny_llama_dir, train_file, tmp_path,
                                                                 launch_env):
    # The multi-node command, once per node; here both "nodes" are this machine, reached over 127.0.0.1.
    port, out = free_port(), tmp_path / "out"
    job = flags(tiny_llama_dir, train_file, out, batch=GLOBAL_BATCH // 2, packed=True, cache=tmp_path / "cache")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "lmtune.cli", "launch", "--world_size", "2", "--nnodes", "2", "--node_rank", str(node),
         "--master_addr", "127.0.0.1", "--master_port", str(port), "finetune_clm", *job],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]  # fmt: skip
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "--nnodes 2 --node_rank 1 --master_addr 127.0.0.1" in outputs[1]
    assert_same_adapter(out, reference[True])
    assert_rank_zero_reported(outputs[0])
    assert "lmtune: training loss" not in outputs[1]
    assert FIND_UNUSED_WARNING not in outputs[0] + outputs[1]
    # Both "nodes" share one cache directory here: datasets writes each file whole, then renames it into place.
    assert len(list((tmp_path / "cache" / "lmtune-rendered").glob("rendered-*.arrow"))) == 1


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install mpich)")
def test_mpirun_two_ranks_train_the_same_adapter(reference, tiny_llama_dir, train_file, tmp_path, launch_env):
    # The reference's syntax (MPICH Hydra), no MASTER_ADDR: lmtune maps PMI_RANK/PMI_SIZE/MPI_LOCALRANKID itself.
    out = tmp_path / "out"
    command = ["mpirun", "-n", "2", "-ppn", "2", "-genv", "OMP_NUM_THREADS=1", sys.executable, "-m",
               "lmtune.finetune_clm", *flags(tiny_llama_dir, train_file, out, batch=2, accumulation=2,
                                             cache=tmp_path / "cache"),
               "--ddp_backend", "gloo", "--ddp_timeout", "600"]  # fmt: skip
    env = dict(os.environ, MASTER_PORT=str(free_port()))  # a free port; the address is left to lmtune
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(out, reference[False])
    assert_rank_zero_reported(result.stdout + result.stderr)


def deepspeed_installed() -> bool:
    return shutil.which("deepspeed") is not None and importlib.util.find_spec("deepspeed") is not None


ZERO2_FP32 = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "train_batch_size": "auto",
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


def launch(*launcher_flags: str, job: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmtune.cli", "launch", "--world_size", "2", *launcher_flags,
               "--master_port", str(free_port()), "finetune_clm", *job]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


# DeepSpeed's engine says so when ZeRO runs with an optimizer it did not build (here the Trainer's SGD).
ZERO_ENGINE_RAN = "You are using ZeRO with an untested optimizer"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_installed(), reason="deepspeed not installed (pip install deepspeed)")
def test_deepspeed_zero2_under_torchrun_trains_the_same_adapter(reference, tiny_llama_dir, train_file, tmp_path,
                                                                launch_env):
    # --deepspeed works under any launcher; torchrun here, the DeepSpeed launcher below.
    config, out = tmp_path / "zero2.json", tmp_path / "out"
    config.write_text(json.dumps(ZERO2_FP32))
    job = flags(tiny_llama_dir, train_file, out, batch=2, accumulation=2, cache=tmp_path / "cache")
    result = launch(job=[*job, "--deepspeed", str(config)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert ZERO_ENGINE_RAN in result.stdout + result.stderr
    assert_same_adapter(out, reference[False])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_installed(), reason="deepspeed not installed (pip install deepspeed)")
def test_deepspeed_zero3_reference_config_saves_the_whole_adapter(reference, tiny_llama_dir, train_file, tmp_path,
                                                                  launch_env):
    # The reference's llama2_ds_zero3_config.json (ZeRO-3, bf16, clipping 1.0, "auto" batch sizes), packed rows.
    out = tmp_path / "out"
    config = REPO_ROOT / "examples" / "ds_zero3_config.json"
    job = flags(tiny_llama_dir, train_file, out, batch=GLOBAL_BATCH // 2, packed=True, cache=tmp_path / "cache")
    result = launch("--use_deepspeed", job=[*job, "--deepspeed", str(config), "--bf16"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # lmtune launch preloads jemalloc for its ranks only when LMTUNE_ALLOCATOR=jemalloc asks for it.
    assert re.search(r"running: (LD_PRELOAD=\S+ )?deepspeed --num_nodes 1 --num_gpus 2", result.stdout), result.stdout
    assert ZERO_ENGINE_RAN in result.stdout + result.stderr
    # ZeRO-3 partitions every weight across the ranks; the saved adapter must still be whole and trained
    # (LoRA + ZeRO-3 is known elsewhere to save empty tensors). bf16 rounding: looser tolerance.
    assert_same_adapter(out, reference[True], tolerance=3e-2)
