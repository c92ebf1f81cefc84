"""Launcher env mapping, device/backend checks, lmtune.launch commands, and real 2-rank gloo launches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from lmtune import launch
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.launch import LaunchArgs, build_launch_command, main, parse_launch_args
from lmtune.train.distributed import (
    DistributedInfo,
    apply_launcher_env,
    check_device,
    is_main_process,
    map_launcher_env,
    resolve_ddp_backend,
    threads_per_rank,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HAS_CUDA = torch.cuda.is_available()
HAS_XPU = hasattr(torch, "xpu") and torch.xpu.is_available()
MPICH_1_OF_2 = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.fixture
def nodefile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nodefile").write_text("node0 slots=8\nnode1 slots=8\n")


@pytest.fixture
def launchers_installed(monkeypatch):
    """Pretend mpirun and deepspeed are on PATH so exact argv tests run anywhere."""
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")


# --- map_launcher_env ------------------------------------------------------------------------

OMPI_FREE_PMIX = {"PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
MULTI_NODE = {"PMI_RANK": "5", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "3", "MASTER_ADDR": "node0"}  # fmt: skip


def _torch_env(rank, size, local_rank, local_size, addr="127.0.0.1", port="29500"):
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_size), "MASTER_ADDR": addr, "MASTER_PORT": port}  # fmt: skip


@pytest.mark.parametrize(("env", "expected"), [
    pytest.param(MPICH_1_OF_2, _torch_env(1, 2, 1, 2), id="mpich-single-node"),
    pytest.param({**OMPI_FREE_PMIX, "PMIX_RANK": "0"}, _torch_env(0, 2, 1, 2), id="pmix-rank"),
    pytest.param({**MULTI_NODE, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"},
                 _torch_env(5, 16, 1, 4, "10.0.0.1", "29600"), id="mpich-multi-node"),
    pytest.param({**MULTI_NODE, "MASTER_ADDR": "10.0.0.1"}, _torch_env(5, 16, 1, 4, "10.0.0.1"),
                 id="mpich-multi-node-default-port"),
    pytest.param(OPEN_MPI, _torch_env(3, 4, 1, 2, "node0"), id="open-mpi"),
    pytest.param({"PMI_RANK": "0", "PMI_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"},
                 _torch_env(0, 2, 0, 2), id="user-exported-local-rank"),
    pytest.param({**_torch_env(1, 2, 1, 2), **MPICH_1_OF_2}, {}, id="torchrun-passthrough"),
    pytest.param({}, {}, id="not-distributed"),
    pytest.param({"PMI_RANK": "0", "PMI_SIZE": "1"}, {}, id="single-rank-mpirun"),
])  # fmt: skip
def test_map_launcher_env(env, expected):
    assert map_launcher_env(env) == expected


@pytest.mark.parametrize(("env", "match"), [
    (MULTI_NODE, r"export MASTER_ADDR=<node 0's IP address> and MASTER_PORT=<a free port"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, r"set PMI_RANK/PMIX_RANK but not MPI_LOCALRANKID, MPI_LOCALNRANKS"),
    ({**MPICH_1_OF_2, "PMI_RANK": "x"}, r"PMI_RANK must be an integer \(got 'x'\)"),
    ({**MPICH_1_OF_2, "PMI_RANK": "2"}, r"inconsistent \(rank=2, world size=2"),
    ({**MPICH_1_OF_2, "MASTER_PORT": "http"}, r"MASTER_PORT must be a TCP port number 1-65535 \(got 'http'\)"),
])  # fmt: skip
def test_map_launcher_env_errors(env, match):
    with pytest.raises(ConfigError, match=match):
        map_launcher_env(env)


# --- apply_launcher_env, threads, is_main_process ---------------------------------------------


def test_apply_writes_variables_and_splits_cores(eight_cores, restore_threads):
    env = dict(MPICH_1_OF_2)
    info = apply_launcher_env(env)
    assert info == DistributedInfo(rank=1, world_size=2, local_rank=1, local_world_size=2, launcher="mpi")
    assert info.is_distributed
    assert env["RANK"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert env["OMP_NUM_THREADS"] == "4" and torch.get_num_threads() == 4


def test_apply_keeps_user_thread_count(eight_cores, restore_threads):
    torch.set_num_threads(1)
    env = {**MPICH_1_OF_2, "OMP_NUM_THREADS": "56"}
    apply_launcher_env(env)
    assert env["OMP_NUM_THREADS"] == "56" and torch.get_num_threads() == 1


@pytest.mark.parametrize(("env", "info", "added"), [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, DistributedInfo(3, 8, 1, 8, "torchrun"), "1"),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}, DistributedInfo(3, 8, 0, 2, "torchrun"), "4"),
    ({}, DistributedInfo(0, 1, 0, 1, "none"), None),  # no launcher: the environment stays as it was
])  # fmt: skip
def test_apply_without_mpi(eight_cores, restore_threads, env, info, added):
    assert apply_launcher_env(env) == info
    assert env.get("OMP_NUM_THREADS") == added


@pytest.mark.parametrize(("local_world_size", "cores", "expected"), [(2, 8, 4), (3, 8, 2), (16, 8, 1), (4, None, 2)])
def test_threads_per_rank(eight_cores, local_world_size, cores, expected):
    assert threads_per_rank(local_world_size, cores) == expected


@pytest.mark.parametrize(("env", "expected"), [({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False)])
def test_is_main_process(env, expected):
    assert is_main_process(env) is expected


# --- resolve_ddp_backend ---------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "device", "world_size", "expected"), [
    (None, "cpu", 2, "gloo"), ("", "cpu", 2, "gloo"), (None, "cpu", 1, None),
    (None, "cuda", 4, "nccl"), ("gloo", "cpu", 2, "gloo"), ("GLOO", "cpu", 1, "gloo"),
])  # fmt: skip
def test_backend_defaults(requested, device, world_size, expected):
    assert resolve_ddp_backend(requested, device, world_size=world_size) == expected


def test_backend_default_reads_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_ddp_backend(None, "cpu") == "gloo"
    assert resolve_ddp_backend(None, "auto") == ("nccl" if HAS_CUDA else "xccl" if HAS_XPU else "gloo")


def test_ccl_without_bindings_explains_the_install(monkeypatch):
    for module in ("oneccl_bindings_for_pytorch", "torch_ccl"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes import fail
    with pytest.raises(UnsupportedError, match=r"pip install oneccl_bind_pt -f https://developer\.intel\.com/"
                       r"ipex-whl-stable-cpu.*setvars\.sh.*--ddp_backend gloo"):  # fmt: skip
        resolve_ddp_backend("ccl", "cpu")


@pytest.mark.parametrize("module", ["oneccl_bindings_for_pytorch", "torch_ccl"])
def test_ccl_with_bindings(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "oneccl_bindings_for_pytorch", None)
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    assert resolve_ddp_backend("ccl", "cpu") == "ccl"


@pytest.mark.parametrize(("requested", "device", "error", "match"), [
    ("ccl", "cuda", ConfigError, r"ccl drives Intel CPUs and GPUs \(got --device cuda\)"),
    ("nccl", "cpu", UnsupportedError, r"nccl needs an NVIDIA GPU.*--device cpu.*Fix: use --ddp_backend gloo"),
    ("hccl", "cpu", UnsupportedError, r"hccl needs Intel Gaudi"),
    ("xccl", "cpu", UnsupportedError, r"xccl needs an Intel GPU"),
    ("glooo", "cpu", ConfigError, r"--ddp_backend must be one of gloo, nccl, ccl, mpi, xccl, hccl "
                                  r"\(got 'glooo'\)\. Did you mean 'gloo'\?"),
    pytest.param("nccl", "cuda", UnsupportedError, r"CUDA available: False\). Fix: use --device cpu with "
                 r"--ddp_backend gloo", marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param("mpi", "cpu", UnsupportedError, r"mpi needs a torch built with MPI support",
                 marks=pytest.mark.skipif(torch.distributed.is_mpi_available(), reason="torch has MPI")),
])  # fmt: skip
def test_backend_errors(requested, device, error, match):
    with pytest.raises(error, match=match):
        resolve_ddp_backend(requested, device)


# --- check_device ----------------------------------------------------------------------------


def test_cpu_and_auto():
    assert check_device(" CPU ") == "cpu"
    assert check_device("auto") == ("cuda" if HAS_CUDA else "xpu" if HAS_XPU else "cpu")


@pytest.mark.parametrize(("device", "error", "match"), [
    ("cpuu", ConfigError, "Did you mean 'cpu'"),
    ("tpu", ConfigError, r"--device must be one of auto, cpu, cuda, xpu, hpu \(got 'tpu'\)"),
    pytest.param("cuda", UnsupportedError, r"--device cuda needs .* is False here .*Fix: use --device cpu",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param("xpu", UnsupportedError, r"--device xpu needs .* is False here .*Fix: use --device cpu",
                 marks=pytest.mark.skipif(HAS_XPU, reason="this machine has an Intel GPU")),
])  # fmt: skip
def test_device_errors(device, error, match):
    with pytest.raises(error, match=match):
        check_device(device)


@pytest.mark.parametrize("flags", [{}, {"use_habana": True}, {"use_lazy_mode": True}])
def test_hpu_without_habana_software(monkeypatch, flags):
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", None)
    device = "cpu" if flags else "hpu"
    with pytest.raises(UnsupportedError, match=r"SynapseAI.*optimum-habana.*use --device cpu"):
        check_device(device, **flags)


def test_hpu_with_habana_software(monkeypatch):
    monkeypatch.setitem(sys.modules, "habana_frameworks", types.ModuleType("habana_frameworks"))
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", types.ModuleType("habana_frameworks.torch"))
    assert check_device("hpu", use_habana=True, use_lazy_mode=True) == "hpu"
    with pytest.raises(ConfigError, match=r"run on Gaudi only \(got --device cpu\)"):
        check_device("cpu", use_habana=True)


# --- build_launch_command --------------------------------------------------------------------

TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1", "--node_rank", "0",
            "--master_addr", "127.0.0.1", "--master_port", "29500"]  # fmt: skip
CLM = ["-m", "lmtune.finetune_clm", "--peft", "lora"]


@pytest.mark.parametrize(("script", "args", "target"), [
    ("finetune_clm.py", ["--peft", "lora"], CLM),
    ("./finetune_clm.py", ["--peft", "lora"], CLM),
    ("finetune_clm", ["--peft", "lora"], CLM),
    ("finetune_seq2seq.py", [], ["-m", "lmtune.finetune_seq2seq"]),
    ("lmtune", ["finetune", "--peft", "lora"], ["-m", "lmtune.cli", "finetune", "--peft", "lora"]),
    ("finetune", ["--x"], ["-m", "lmtune.cli", "finetune", "--x"]),
    ("dpo_clm.py", ["--beta", "0.1"], ["-m", "lmtune.finetune_dpo", "--beta", "0.1"]),
    ("lmtune", ["dpo", "--orpo"], ["-m", "lmtune.cli", "dpo", "--orpo"]),
])  # fmt: skip
def test_torchrun_command(script, args, target):
    assert build_launch_command(4, "torchrun", script, args) == TORCHRUN + target


def test_torchrun_multi_node_and_python_file(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    assert build_launch_command(8, "torchrun", str(script), ["a"], nnodes=2, node_rank=1,
                                master_addr="10.0.0.1", master_port=29600) == [
        PY, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--master_port", "29600", str(script), "a",
    ]  # fmt: skip


@pytest.mark.parametrize(("flavour", "world_size", "kwargs", "launcher_args"), [
    ("mpich", 2, {}, ["-n", "2", "-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT", "29500"]),
    ("mpich", 16, {"nnodes": 4, "master_addr": "node0", "hostfile": "nodefile"},
     ["-n", "16", "-ppn", "4", "-f", "nodefile", "-genv", "MASTER_ADDR", "node0", "-genv", "MASTER_PORT", "29500"]),
    ("openmpi", 4, {"nnodes": 2, "master_addr": "node0", "master_port": 29700, "hostfile": "nodefile"},
     ["-n", "4", "--map-by", "ppr:2:node", "--hostfile", "nodefile", "-x", "MASTER_ADDR=node0",
      "-x", "MASTER_PORT=29700"]),
])  # fmt: skip
def test_mpi_command(launchers_installed, nodefile, flavour, world_size, kwargs, launcher_args):
    command = build_launch_command(world_size, "mpi", "finetune_clm.py", ["--peft", "lora"], mpi_flavour=flavour,
                                   euid=1000, **kwargs)  # fmt: skip
    assert command == ["mpirun", *launcher_args, PY, *CLM]


@pytest.mark.parametrize(("flavour", "euid", "allowed"), [
    ("openmpi", 0, ["--allow-run-as-root"]), ("openmpi", 1000, []), ("mpich", 0, []), ("mpich", 1000, []),
])  # fmt: skip
def test_open_mpi_as_root_is_allowed_explicitly(launchers_installed, monkeypatch, flavour, euid, allowed):
    # Open MPI's mpirun exits at once when root starts it without the flag; MPICH's Hydra rejects the flag.
    monkeypatch.setattr(launch.os, "geteuid", lambda: euid)  # the default reads the real effective uid
    head = ["mpirun", *allowed, "-n", "2"]
    for explicit in (None, euid):
        command = build_launch_command(2, "mpi", "finetune_clm", [], mpi_flavour=flavour, euid=explicit)
        assert command[:len(head)] == head
        assert command.count("--allow-run-as-root") == len(allowed)


@pytest.mark.parametrize(("output", "flavour"), [
    ("mpirun (Open MPI) 4.1.4\n", "openmpi"), ("HYDRA build details:\n    Version: 4.0.2\n", "mpich"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.11\n", "mpich"),
])  # fmt: skip
def test_mpi_flavour_detection(monkeypatch, output, flavour):
    fake = subprocess.CompletedProcess(["mpirun", "--version"], 0, stdout=output, stderr="")
    monkeypatch.setattr(launch.subprocess, "run", lambda *args, **kwargs: fake)
    assert launch.detect_mpi_flavour() == flavour


def test_deepspeed_commands(launchers_installed, nodefile):
    head = ["deepspeed", "--num_nodes", "1", "--num_gpus", "8", "--master_port", "29500"]
    assert build_launch_command(8, "deepspeed", "finetune_clm.py", ["--peft", "lora"]) == [
        *head, "--no_local_rank", "--module", *CLM[1:]]
    assert build_launch_command(16, "deepspeed", "finetune_clm", [], nnodes=2, hostfile="nodefile") == [
        "deepspeed", "--num_nodes", "2", "--num_gpus", "8", "--master_port", "29500", "--hostfile", "nodefile",
        "--no_local_rank", "--module", "lmtune.finetune_clm"]  # fmt: skip
    assert build_launch_command(16, "deepspeed", "finetune_clm", [], nnodes=2, node_rank=1, master_addr="n0") == [
        "deepspeed", "--num_nodes", "2", "--num_gpus", "8", "--master_port", "29500", "--master_addr", "n0",
        "--no_ssh", "--node_rank", "1", "--no_local_rank", "--module", "lmtune.finetune_clm"]  # fmt: skip


@pytest.mark.parametrize(("mode", "match"), [("mpi", "apt-get install mpich"), ("deepspeed", "pip install deepspeed")])
def test_missing_launcher(monkeypatch, mode, match):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(UnsupportedError, match=match):
        build_launch_command(2, mode, "finetune_clm.py", [])


def test_all_launch_problems_reported_together():
    with pytest.raises(ConfigError) as caught:
        build_launch_command(3, "torchrun", "finetune_clm.py", [], nnodes=2, node_rank=5, master_port=0)
    message = str(caught.value)
    for part in ["--world_size (3) must be a multiple of --nnodes (2)", "--node_rank must be in [0, --nnodes)",
                 "--master_port must be 1-65535 (got 0)", "multi-node launch needs --master_addr"]:  # fmt: skip
        assert part in message


@pytest.mark.parametrize(("mode", "script", "kwargs", "match"), [
    ("torchrun", "finetune_clm.py", {"hostfile": "nodefile"}, "--hostfile is read by --use_mpi and --use_deepspeed"),
    ("mpi", "finetune_clm", {"node_rank": 1, "nnodes": 2, "master_addr": "n0"}, "--node_rank is not used with"),
    ("mpi", "finetune_clm", {"hostfile": "/no/such/nodefile"}, "--hostfile '/no/such/nodefile' does not exist"),
    ("mpirun", "finetune_clm", {}, r"mode must be one of torchrun, mpi, deepspeed \(got 'mpirun'\)"),
    ("torchrun", "finetune_clmm.py", {}, "Did you mean 'finetune_clm'"),
    ("torchrun", "missing/train.py", {}, "script file 'missing/train.py' does not exist"),
    ("torchrun", "lmtune", {"script_args": ["chat"]}, r"needs a subcommand: one of finetune, dpo \(got chat\)"),
])  # fmt: skip
def test_launch_argument_errors(mode, script, kwargs, match):
    script_args = kwargs.pop("script_args", [])
    with pytest.raises(ConfigError, match=match):
        build_launch_command(2, mode, script, script_args, **kwargs)


# --- parse_launch_args and main --------------------------------------------------------------


def test_parse_gaudi_spawn_command_line(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    argv = ["--use_deepspeed", "--world_size", "8", "finetune_clm.py", "--bf16", "True", "--world_size", "3"]
    assert parse_launch_args(argv) == LaunchArgs(8, "deepspeed", "finetune_clm.py", ["--bf16", "True",
                                                 "--world_size", "3"], 1, 0, None, 29500, None)  # fmt: skip
    assert parse_launch_args(["finetune_clm"]).mode == "torchrun"


def test_parse_master_from_environment_and_hostfile(monkeypatch, tmp_path):
    hostfile = tmp_path / "nodefile"
    hostfile.write_text("# node 0 first\n\n10.0.0.7:4   # node0 ip\n10.0.0.8:4\n")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29800")
    args = parse_launch_args(["--world_size", "8", "--use_mpi", "--hostfile", str(hostfile), "finetune_clm.py"])
    assert (args.master_addr, args.master_port) == ("10.0.0.7", 29800)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.9")
    assert parse_launch_args(["--use_mpi", "--hostfile", str(hostfile), "finetune_clm"]).master_addr == "10.0.0.9"


def test_parse_errors_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="not allowed with argument"):
        parse_launch_args(["--use_mpi", "--use_deepspeed", "finetune_clm.py"])
    monkeypatch.setenv("MASTER_PORT", "abc")
    with pytest.raises(ConfigError, match=r"MASTER_PORT must be a port number \(got 'abc'\)"):
        parse_launch_args(["finetune_clm.py"])


def test_main_reports_errors_and_returns_2(capsys):
    assert main(["--world_size", "0", "finetune_clm.py"]) == 2
    assert "lmtune.launch: error: cannot build the launch command: --world_size must be >= 1" in capsys.readouterr().err


# --- real 2-rank launches --------------------------------------------------------------------

ALL_REDUCE_SCRIPT = """
    import json, os, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from lmtune.train.distributed import apply_launcher_env

    info = apply_launcher_env()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    value = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(value)
    result = {"rank": info.rank, "world_size": info.world_size, "launcher": info.launcher,
              "value": value.item(), "threads": torch.get_num_threads()}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as out:
        json.dump(result, out)
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize(("flag", "launcher"), [
    ("--use_torchrun", "torchrun"),
    pytest.param("--use_mpi", "mpi", marks=pytest.mark.skipif(
        shutil.which("mpirun") is None, reason="mpirun not installed (Debian/Ubuntu: apt-get install mpich)")),
])  # fmt: skip
def test_real_two_rank_launch(flag, launcher, tmp_path, monkeypatch, capsys):
    script = tmp_path / "all_reduce.py"
    script.write_text(textwrap.dedent(ALL_REDUCE_SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--world_size", "2", flag, "--master_port", str(_free_port()), str(script), str(out)]) == 0
    assert "lmtune.launch: running: " in capsys.readouterr().out
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text()) == {
            "rank": rank, "world_size": 2, "launcher": launcher, "value": 3.0, "threads": threads_per_rank(2)}
