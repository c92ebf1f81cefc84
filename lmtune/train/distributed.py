"""Launcher environment → torch.distributed settings, device and DDP backend checks.

Stage contract: every entry point calls :func:`apply_launcher_env` first, before
transformers or accelerate create a process group. It reads what the launcher
exported (torchrun, MPICH / Intel MPI / Hydra, Open MPI), writes the variables
``torch.distributed`` reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and picks a per-rank thread count. :func:`check_device`
and :func:`resolve_ddp_backend` then turn ``--device`` and ``--ddp_backend`` into
values this machine can run, or raise a typed error that says how to fix it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from lmtune.errors import ConfigError, UnsupportedError

logger = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"
DEVICES = ("auto", "cpu", "cuda", "xpu", "hpu")
DDP_BACKENDS = ("gloo", "nccl", "ccl", "mpi", "xccl", "hccl")
# The backend torch.distributed uses for each device when --ddp_backend is not given.
_DEFAULT_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "hpu": "hccl"}
# oneCCL >= 1.12 ships `oneccl_bindings_for_pytorch`; older releases `torch_ccl`.
_CCL_MODULES = ("oneccl_bindings_for_pytorch", "torch_ccl")
_CCL_FIX = (
    "Fix: pip install oneccl_bind_pt -f https://developer.intel.com/ipex-whl-stable-cpu "
    "(the release matching your torch version), then "
    "source $(python -c 'from oneccl_bindings_for_pytorch import cwd; print(cwd)')/env/setvars.sh "
    "in the shell that runs mpirun; or use --ddp_backend gloo, which needs nothing extra."
)

Launcher = Literal["torchrun", "mpi", "none"]


class _MpiVariables(NamedTuple):
    rank: tuple[str, ...]
    size: tuple[str, ...]
    local_rank: tuple[str, ...]
    local_size: tuple[str, ...]


# Open MPI first: Open MPI 5 also exports PMIX_RANK, and its OMPI_* names are complete.
_MPI_FLAVOURS: dict[str, _MpiVariables] = {
    "Open MPI": _MpiVariables(
        ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",),
        ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    "MPICH/Intel MPI": _MpiVariables(
        ("PMI_RANK", "PMIX_RANK"), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)
    ),
}


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank, 0 for the main process.
        world_size: Number of processes in the job.
        local_rank: Rank among the processes on this node.
        local_world_size: Number of processes on this node.
        launcher: "torchrun" (or any launcher that sets RANK/WORLD_SIZE itself,
            such as accelerate or deepspeed), "mpi", or "none".
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: Launcher

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` normalised, or raise listing the choices and the closest one."""
    name = value.strip().lower()
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{flag} must be one of {', '.join(choices)} (got {value!r}).{hint}")
    return name


def _read_int(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    """Return the first of ``names`` set in ``environ`` as an int, None if none is set."""
    for name in names:
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.lstrip("-").isdigit():
            raise ConfigError(f"environment variable {name} must be an integer (got {value!r}). Fix: "
                              "unset it or export an integer; the launcher normally sets it.")
        return int(value)
    return None


def map_launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Translate an MPI launcher's environment into torch.distributed variables.

    Args:
        environ: The process environment, usually ``os.environ``.

    Returns:
        The variables to set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT). Empty when torchrun (or the user) already set
        RANK and WORLD_SIZE, or when no launcher started more than one process.

    Raises:
        ConfigError: An MPI variable is not an integer or out of range; the MPI
            does not export the local rank; or a multi-node job has no MASTER_ADDR.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    found = [(flavour, names) for flavour, names in _MPI_FLAVOURS.items()
             if any(name in environ for name in names.rank)]
    if not found:
        return {}
    flavour, names = found[0]
    rank, size = _read_int(environ, names.rank), _read_int(environ, names.size)
    if size is not None and size <= 1:
        return {}
    # Some PMI launchers (e.g. srun --mpi=pmi2) export no local rank; a user can export one.
    local_rank = _read_int(environ, (*names.local_rank, "LOCAL_RANK"))
    local_size = _read_int(environ, (*names.local_size, "LOCAL_WORLD_SIZE"))
    if size is None or local_rank is None or local_size is None:
        missing = [n[0] for n, v in zip(names[1:], (size, local_rank, local_size)) if v is None]
        raise ConfigError(
            f"{flavour} set {'/'.join(names.rank)} but not {', '.join(missing)}, so this rank's place "
            "in the job is unknown. Fix: launch with mpirun from MPICH, Intel MPI or Open MPI, "
            "or export RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each rank."
        )
    if rank is None or not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise ConfigError(
            f"{flavour} variables are inconsistent (rank={rank}, world size={size}, "
            f"local rank={local_rank}, local size={local_size}); allowed: "
            "0 <= rank < world size and 0 <= local rank < local size <= world size. "
            "Fix: do not export these variables by hand; let mpirun set them."
        )
    return {
        "RANK": str(rank), "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_size),
        "MASTER_ADDR": _master_addr(environ, flavour, size, local_size),
        "MASTER_PORT": _master_port(environ),
    }


def _master_addr(environ: Mapping[str, str], flavour: str, size: int, local_size: int) -> str:
    addr = environ.get("MASTER_ADDR", "").strip()
    if addr:
        return addr
    if local_size == size:  # every rank is on this node
        return DEFAULT_MASTER_ADDR
    raise ConfigError(
        f"{flavour} started {size} ranks on several nodes ({local_size} on this one) but "
        "MASTER_ADDR is not set, so the ranks cannot find rank 0. Fix: before mpirun, "
        "export MASTER_ADDR=<node 0's IP address> and MASTER_PORT=<a free port, e.g. "
        f"{DEFAULT_MASTER_PORT}> (MPICH and Intel MPI forward exported variables; with Open "
        "MPI add -x MASTER_ADDR -x MASTER_PORT), or use python -m lmtune.launch --use_mpi "
        "--master_addr <node 0's IP address>."
    )


def _master_port(environ: Mapping[str, str]) -> str:
    port = environ.get("MASTER_PORT", "").strip() or DEFAULT_MASTER_PORT
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"MASTER_PORT must be a TCP port number 1-65535 (got {port!r}). "
            f"Fix: export MASTER_PORT={DEFAULT_MASTER_PORT} or another free port."
        )
    return port


def threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """Split the cores this process may use evenly between the ranks on its node.

    Args:
        local_world_size: Number of processes on this node.
        cores: Cores to share; defaults to the process's CPU affinity set.

    Returns:
        ``cores // local_world_size``, at least 1.
    """
    if cores is None:
        # The affinity set honours taskset/cgroup limits; cpu_count() would oversubscribe.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size))


def apply_launcher_env(environ: MutableMapping[str, str] = os.environ) -> DistributedInfo:
    """Export the torch.distributed variables and a per-rank thread count.

    Call this before transformers or accelerate create the process group. When a
    launcher started this process and OMP_NUM_THREADS is unset, each rank gets
    ``threads_per_rank(local_world_size)`` threads rather than every rank claiming
    every core; a value the user exported is left alone.

    Args:
        environ: The environment to read and update, usually ``os.environ``.

    Returns:
        Where this process sits in the job.

    Raises:
        ConfigError: See :func:`map_launcher_env`.
    """
    mapped = map_launcher_env(environ)
    environ.update(mapped)
    if mapped:
        launcher: Launcher = "mpi"
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "torchrun"
    else:
        return DistributedInfo(0, 1, 0, 1, "none")
    world_size = _read_int(environ, ("WORLD_SIZE",)) or 1
    info = DistributedInfo(
        rank=_read_int(environ, ("RANK",)) or 0,
        world_size=world_size,
        local_rank=_read_int(environ, ("LOCAL_RANK",)) or 0,
        # Unknown local size: assume all ranks share this node; too few threads beats oversubscribing.
        local_world_size=_read_int(environ, ("LOCAL_WORLD_SIZE",)) or world_size,
        launcher=launcher,
    )
    if "OMP_NUM_THREADS" not in environ:
        threads = threads_per_rank(info.local_world_size)
        environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)  # torch read OMP_NUM_THREADS at import, before this
        logger.info("OMP_NUM_THREADS unset: using %d threads per rank; export it to override.", threads)
    return info


def is_main_process(environ: Mapping[str, str] = os.environ) -> bool:
    """True on global rank 0, and in a process that no launcher started.

    Raises:
        ConfigError: RANK is set but not an integer.
    """
    return (_read_int(environ, ("RANK",)) or 0) == 0


def _importable(module: str) -> bool:
    try:
        return importlib.import_module(module) is not None
    except ImportError:
        return False


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def check_device(device: str, *, use_habana: bool = False, use_lazy_mode: bool = False) -> str:
    """Resolve ``--device`` to a device this machine has.

    Args:
        device: One of :data:`DEVICES`. "auto" picks cuda, then xpu, then hpu
            (only when habana_frameworks imports), then cpu.
        use_habana: ``--use_habana`` was given; it implies hpu.
        use_lazy_mode: ``--use_lazy_mode`` was given; it implies hpu.

    Returns:
        "cpu", "cuda", "xpu" or "hpu".

    Raises:
        ConfigError: Unknown device name, or Habana flags with a non-hpu device.
        UnsupportedError: The requested device is not available on this machine.
    """
    name = _check_choice("--device", device, DEVICES)
    if name == "hpu" or use_habana or use_lazy_mode:
        if not _importable("habana_frameworks.torch"):
            raise UnsupportedError(
                f"--device {name} / --use_habana / --use_lazy_mode need Intel Gaudi (HPU), but "
                "habana_frameworks.torch is not importable here. Gaudi runs need Habana's SynapseAI "
                "software stack with its PyTorch build, plus optimum-habana. Fix: on this machine use "
                "--device cpu and drop --use_habana and --use_lazy_mode."
            )
        if name not in ("hpu", "auto"):
            raise ConfigError(
                f"--use_habana and --use_lazy_mode run on Gaudi only (got --device {name}). "
                "Fix: pass --device hpu, or drop --use_habana and --use_lazy_mode."
            )
        return "hpu"
    if name == "auto":
        return _detect_device()
    available = {"cuda": torch.cuda.is_available, "xpu": _xpu_available}.get(name, lambda: True)
    if not available():
        needs = {"cuda": "an NVIDIA GPU and CUDA-built torch", "xpu": "an Intel GPU and XPU-built torch"}
        raise UnsupportedError(
            f"--device {name} needs {needs[name]}, but torch.{name}.is_available() is False here "
            f"(torch {torch.__version__}). Fix: use --device cpu or --device auto."
        )
    return name


def _detect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if _xpu_available():
        return "xpu"
    # find_spec first: importing habana_frameworks.torch initialises the HPU runtime.
    if importlib.util.find_spec("habana_frameworks") is not None and _importable("habana_frameworks.torch"):
        return "hpu"
    return "cpu"


def resolve_ddp_backend(requested: str | None, device: str, *, world_size: int | None = None) -> str | None:
    """Resolve ``--ddp_backend`` to a backend that can run here.

    "ccl" imports Intel's oneCCL bindings, which registers the backend with
    torch.distributed. accelerate no longer initialises "ccl" itself: the caller
    must call ``torch.distributed.init_process_group("ccl")`` before building
    ``TrainingArguments`` and leave their ``ddp_backend`` unset.

    Args:
        requested: ``--ddp_backend`` as typed; None or "" picks the device's default.
        device: "cpu", "cuda", "xpu" or "hpu" ("auto" goes through :func:`check_device`).
        world_size: Number of processes; defaults to the WORLD_SIZE variable, or 1.

    Returns:
        The backend name, or None when no backend was requested and only one
        process runs.

    Raises:
        ConfigError: Unknown backend name, or a backend that does not drive ``device``.
        UnsupportedError: The backend's library or hardware is missing here.
    """
    resolved_device = check_device(device) if device.strip().lower() == "auto" else device
    name = (requested or "").strip().lower()
    if not name:
        size = world_size if world_size is not None else (_read_int(os.environ, ("WORLD_SIZE",)) or 1)
        return _DEFAULT_BACKENDS.get(resolved_device, "gloo") if size > 1 else None
    _check_backend(_check_choice("--ddp_backend", requested or "", DDP_BACKENDS), resolved_device)
    return name


def _xccl_available(device: str) -> bool:
    is_xccl_available = getattr(torch.distributed, "is_xccl_available", lambda: False)
    return device == "xpu" and _xpu_available() and is_xccl_available()


# backend → (does it run with this device here?, what it needs); "ccl" is checked by _import_ccl.
_BACKEND_NEEDS: dict[str, tuple[Callable[[str], bool], str]] = {
    "gloo": (lambda device: True, "nothing"),
    "nccl": (lambda device: device == "cuda" and torch.cuda.is_available(),
             "an NVIDIA GPU (--device cuda with torch.cuda.is_available())"),
    "mpi": (lambda device: torch.distributed.is_mpi_available(),
            "a torch built with MPI support (launching with mpirun does not need it)"),
    "xccl": (_xccl_available, "an Intel GPU (--device xpu with torch's XPU build)"),
    "hccl": (lambda device: device == "hpu" and _importable("habana_frameworks.torch"),
             "Intel Gaudi (--device hpu with Habana's SynapseAI software and optimum-habana)"),
}


def _check_backend(name: str, device: str) -> None:
    if name == "ccl":
        _import_ccl(device)
        return
    runs_here, needs = _BACKEND_NEEDS[name]
    if not runs_here(device):
        default = _DEFAULT_BACKENDS.get(device, "gloo")
        fix = f"--ddp_backend {default}" if default != name else "--device cpu with --ddp_backend gloo"
        raise UnsupportedError(
            f"--ddp_backend {name} needs {needs}; this run has --device {device} (torch "
            f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}). Fix: use {fix}."
        )


def _import_ccl(device: str) -> None:
    if device not in ("cpu", "xpu"):
        raise ConfigError(
            f"--ddp_backend ccl drives Intel CPUs and GPUs (got --device {device}). "
            f"Fix: use --ddp_backend {_DEFAULT_BACKENDS.get(device, 'gloo')} for {device}."
        )
    errors = []
    for module in _CCL_MODULES:
        try:
            importlib.import_module(module)  # registers the "ccl" backend with torch.distributed
            return
        except (ImportError, OSError) as err:  # OSError: libccl found but setvars.sh not sourced
            errors.append(f"{module}: {err}")
    raise UnsupportedError(
        "--ddp_backend ccl needs Intel's oneCCL bindings for PyTorch, which do not import here "
        f"({'; '.join(errors)}). {_CCL_FIX}"
    )
