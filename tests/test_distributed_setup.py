"""What a process settles before TrainingArguments, the per-node data cache, and the CPU-node install script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lmtune.args import ProcessFlags, parse_flags
from lmtune.cli import main, main_clm
from lmtune.data import pipeline
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.train.distributed import fsdp_notice, setup_process
from lmtune.train.zero import init_deepspeed_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "docker" / "install_cpu_node.sh"
NO_HABANA = {"habana_frameworks": None, "habana_frameworks.torch": None}


@pytest.fixture
def no_habana(monkeypatch):
    for module, value in NO_HABANA.items():
        monkeypatch.setitem(sys.modules, module, value)  # None in sys.modules makes the import fail


@pytest.fixture
def no_ccl(monkeypatch):
    for module in ("oneccl_bindings_for_pytorch", "torch_ccl"):
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def clean_launcher_env(monkeypatch):
    """No launcher variables; whatever setup_process exports is undone afterwards."""
    saved = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                 "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keep this process's thread count
    yield
    os.environ.clear()
    os.environ.update(saved)


# --- ProcessFlags: the flags acted on before TrainingArguments exists, from the one parse -------


@pytest.mark.parametrize(("argv", "expected"), [
    ([], ProcessFlags()),
    (["--output_dir", "o", "--device", "hpu", "--use_habana", "--use_lazy_mode", "--lora_target_modules", "q", "k"],
     ProcessFlags(device="hpu", use_habana=True, use_lazy_mode=True)),
    (["--no_cuda", "--ddp_backend", "ccl", "--ddp_timeout", "60", "--group_by_length", "True"],
     ProcessFlags(ddp_backend="ccl", ddp_timeout=60)),
    (["--ddp_backend=gloo", "--deepspeed", "ds.json"], ProcessFlags(ddp_backend="gloo", deepspeed="ds.json")),
    (["--use_oneccl", "True"], ProcessFlags(ddp_backend="ccl")),
])  # fmt: skip
def test_process_flags(argv, expected):
    assert ProcessFlags.from_flags(parse_flags(argv)) == expected


def test_process_flags_read_config_files(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("device: hpu\nuse_habana: true\ndeepspeed: examples/ds_zero3_config.json\n")
    assert ProcessFlags.from_flags(parse_flags([f"--config={recipe}"])) == ProcessFlags(
        device="hpu", use_habana=True, deepspeed="examples/ds_zero3_config.json")


def test_a_bad_process_flag_fails_the_one_parse():
    with pytest.raises(ConfigError, match="invalid arguments --device tpu"):
        parse_flags(["--device", "tpu"])


# --- setup_process -----------------------------------------------------------------------------


def test_setup_checks_the_device_before_the_launcher_environment(no_habana, clean_launcher_env, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "not-a-number")  # would be a ConfigError, were it read first
    with pytest.raises(UnsupportedError, match=r"need Intel Gaudi \(HPU\).*SynapseAI"):
        setup_process("hpu", use_habana=True, use_lazy_mode=True)


def test_setup_maps_mpi_and_rejects_backends_this_machine_lacks(clean_launcher_env, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    info = setup_process("cpu", ddp_backend="gloo")
    assert (info.rank, info.world_size, info.launcher) == (1, 2, "mpi")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")
    with pytest.raises(UnsupportedError, match=r"--ddp_backend nccl needs an NVIDIA GPU"):
        setup_process("cpu", ddp_backend="nccl")


def test_setup_ccl_without_bindings_fails_with_the_install_command(no_ccl, clean_launcher_env):
    with pytest.raises(UnsupportedError, match=r"oneCCL bindings.*pip install oneccl_bind_pt .*--ddp_backend gloo"):
        setup_process("cpu", ddp_backend="ccl")


def test_setup_ccl_single_process_only_imports_the_bindings(clean_launcher_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "oneccl_bindings_for_pytorch", types.ModuleType("oneccl_bindings_for_pytorch"))
    assert setup_process("cpu", ddp_backend="ccl").world_size == 1
    assert not torch.distributed.is_initialized()


def test_deepspeed_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UnsupportedError, match=r"--deepspeed needs the deepspeed package.*pip install deepspeed"):
        init_deepspeed_process_group("cpu", 0, 1)


def test_fsdp_on_cpu_says_it_runs_as_ddp():
    assert fsdp_notice(False, True) is None and fsdp_notice(True, False) is None
    assert "uses DDP and every rank holds the whole model" in fsdp_notice(True, True)


# The reference's Gaudi and oneCCL command lines, on this machine: exit code 2 and the fix, before any
# model loads (the model path does not even exist).
@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "hpu", "--use_habana", "--use_lazy_mode"],
     "lmtune: error: --device hpu / --use_habana / --use_lazy_mode need Intel Gaudi (HPU), but "
     "habana_frameworks.torch is not importable here."),
    (["--use_habana"], "Fix: on this machine use --device cpu and drop --use_habana and --use_lazy_mode."),
    (["--no_cuda", "--ddp_backend", "ccl"],
     "lmtune: error: --ddp_backend ccl needs Intel's oneCCL bindings for PyTorch, which do not import here"),
])  # fmt: skip
def test_gaudi_and_ccl_command_lines_fail_at_once(no_habana, no_ccl, clean_launcher_env, tmp_path, capsys, flags,
                                                   message):
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--train_file", str(tmp_path / "none.json"),
            "--output_dir", str(tmp_path / "out"), "--do_train", *flags]
    assert main_clm(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_lmtune_launch_is_a_command(capsys):
    assert main(["launch", "--world_size", "0", "finetune_clm"]) == 2
    assert "lmtune launch: error: cannot build the launch command: --world_size must be >= 1" in capsys.readouterr().err


# --- the datasets cache that the ranks of a node share (lmtune.data.pipeline) ---------------


@pytest.fixture
def counted_tokenizing(monkeypatch):
    """How many batches were tokenized in this process (a cache hit tokenizes none)."""
    calls = []
    real = pipeline.tokenize_segment_batch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_segment_batch", counted)
    return calls


def _prepare(tokenizer, path, cache, **kwargs):
    inputs = dict(train_file=str(path), need_validation=True, validation_split_percentage=20,
                  settings=RenderSettings(max_seq_length=256), dataset_cache_directory=str(cache))
    return prepare_data(tokenizer, **{**inputs, **kwargs})


def test_second_preparation_reads_the_cache(tokenizer, alpaca_file, tmp_path, counted_tokenizing):
    cache = tmp_path / "cache"
    first = _prepare(tokenizer, alpaca_file, cache)
    tokenized = len(counted_tokenizing)
    assert tokenized == 2 and len(list((cache / "lmtune-rendered").iterdir())) == 2  # train, validation
    second = _prepare(tokenizer, alpaca_file, cache)  # what a node's other ranks do after its local main
    assert len(counted_tokenizing) == tokenized
    for split in ("train", "validation"):
        assert getattr(second, split).to_list() == getattr(first, split).to_list(), split
    assert second.stats == first.stats
    _prepare(tokenizer, alpaca_file, cache, overwrite_cache=True)
    assert len(counted_tokenizing) == 2 * tokenized


def test_cache_key_follows_data_settings_and_tokenizer(tokenizer, alpaca_file, tmp_path, counted_tokenizing):
    cache = tmp_path / "cache"
    _prepare(tokenizer, alpaca_file, cache)
    _prepare(tokenizer, alpaca_file, cache, settings=RenderSettings(max_seq_length=128))
    _prepare(tokenizer, alpaca_file, cache, seed=7)  # another validation split
    tokenizer.save_pretrained(tmp_path / "tok")
    other = type(tokenizer).from_pretrained(tmp_path / "tok")
    other.add_tokens(["<new>"])
    _prepare(other, alpaca_file, cache)
    alpaca_file.write_text(alpaca_file.read_text().replace("a", "b", 1), encoding="utf-8")  # the data changed
    _prepare(tokenizer, alpaca_file, cache)
    assert len(counted_tokenizing) == 5 * 2


def test_keep_in_memory_writes_no_cache_files(tokenizer, alpaca_file, tmp_path):
    cache = tmp_path / "cache"
    kept = _prepare(tokenizer, alpaca_file, cache, keep_in_memory=True)
    assert not (cache / "lmtune-rendered").exists() or not any((cache / "lmtune-rendered").iterdir())
    assert kept.train.to_list() == _prepare(tokenizer, alpaca_file, tmp_path / "other").train.to_list()


def test_two_workers_render_what_one_does(tokenizer, alpaca_file, tmp_path):
    one = _prepare(tokenizer, alpaca_file, tmp_path / "one", dataset_concatenation=True)
    two = _prepare(tokenizer, alpaca_file, tmp_path / "two", dataset_concatenation=True, preprocessing_num_workers=2)
    assert two.train.to_list() == one.train.to_list() and two.stats == one.stats and two.packing == one.packing


def test_default_cache_is_the_datasets_cache(tokenizer, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    prepare_data(tokenizer, train_file=str(alpaca_file))
    assert len(list((tmp_path / "hf" / "lmtune-rendered").glob("rendered-*.arrow"))) == 1


# --- docker/install_cpu_node.sh, the install steps of docker/Dockerfile ----------------------


def run_install(*args: str, ssh_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SSH_DIR=str(ssh_dir))
    return subprocess.run(["bash", str(INSTALL_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_install_script_rejects_bad_options(tmp_path):
    result = run_install("--sshd-port", "99999", ssh_dir=tmp_path)
    assert result.returncode == 2 and "--sshd-port must be a TCP port 1-65535 (got '99999')" in result.stderr
    result = run_install("--bogus", ssh_dir=tmp_path)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
    help_text = run_install("--help", ssh_dir=tmp_path).stdout
    assert "--sshd-port PORT" in help_text and "--no-sshd" in help_text


@pytest.mark.skipif(shutil.which("sshd") is None or shutil.which("mpirun") is None or os.geteuid() != 0,
                    reason="needs root, mpirun and sshd (bash docker/install_cpu_node.sh installs them)")
def test_install_script_configures_sshd_on_a_custom_port_idempotently(tmp_path):
    first = run_install("--sshd-port", "2345", "--no-apt", "--no-pip", ssh_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "sshd configuration valid: port 2345" in first.stdout and "Version:" in first.stdout
    server = (tmp_path / "sshd_config.d" / "lmtune.conf").read_text()
    assert "Port 2345\n" in server and "PasswordAuthentication no" in server
    assert "Port 2345\n" in (tmp_path / "ssh_config.d" / "lmtune.conf").read_text()
    key = (tmp_path / "ssh_host_ed25519_key.pub").read_text()
    second = run_install("--sshd-port", "2345", "--no-apt", "--no-pip", ssh_dir=tmp_path)
    assert second.returncode == 0 and "wrote" not in second.stdout  # nothing changed the second time
    assert (tmp_path / "ssh_host_ed25519_key.pub").read_text() == key
    third = run_install("--sshd-port", "2200", "--no-apt", "--no-pip", ssh_dir=tmp_path)
    assert "Port 2200\n" in (tmp_path / "sshd_config.d" / "lmtune.conf").read_text(), third.stderr


def test_dockerfile_builds_with_the_script_and_a_custom_ssh_port():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG SSHD_PORT=22" in dockerfile and "EXPOSE ${SSHD_PORT}" in dockerfile
    assert 'RUN bash docker/install_cpu_node.sh --sshd-port "${SSHD_PORT}"' in dockerfile
    assert "FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu" in dockerfile  # Debian 12, like CI
    assert 'CMD ["/usr/sbin/sshd", "-D", "-e"]' in dockerfile
    for copied in ("pyproject.toml", "lmtune", "docker/install_cpu_node.sh"):
        assert (REPO_ROOT / copied).exists(), copied


def test_examples_carry_the_reference_zero3_config():
    config = json.loads((REPO_ROOT / "examples" / "ds_zero3_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 1.0 and config["train_micro_batch_size_per_gpu"] == "auto"


def test_a_two_worker_map_leaves_the_environment_as_it_was(tokenizer, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    environ = os.environ
    _prepare(tokenizer, alpaca_file, tmp_path / "cache", preprocessing_num_workers=2, keep_in_memory=True)
    assert os.environ is environ and "TOKENIZERS_PARALLELISM" not in os.environ
