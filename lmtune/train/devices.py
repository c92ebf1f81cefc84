"""Which device and which DDP backend a run can use here, or a typed error that says how to fix it.

Stage contract: :func:`check_device` turns ``--device`` / ``--use_habana`` /
``--use_lazy_mode`` into a device this machine has; :func:`resolve_ddp_backend`
turns ``--ddp_backend`` into a backend that drives it; :func:`init_ccl_process_group`
starts a oneCCL process group, which accelerate no longer does itself. All three run
before any weights load, so a Gaudi command line on a Xeon, or ``ccl`` without
Intel's bindings, stops at once with the fix instead of a traceback.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from datetime import timedelta

import torch

from lmtune.errors import ConfigError, UnsupportedError
from lmtune.model.inference import DEVICES, check_choice, importable, resolve_device, xpu_available

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


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() else 1


def check_device(device: str, *, use_habana: bool = False, use_lazy_mode: bool = False) -> str:
    """Resolve ``--device`` to a device this machine has (``lmtune.model.inference.resolve_device``).

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
    name = check_choice("--device", device, DEVICES)
    if not (use_habana or use_lazy_mode):
        return resolve_device(name)
    resolve_device("hpu")  # the missing Habana software is the first thing to fix
    if name not in ("hpu", "auto"):
        raise ConfigError(
            f"--use_habana and --use_lazy_mode run on Gaudi only (got --device {name}). "
            "Fix: pass --device hpu, or drop --use_habana and --use_lazy_mode."
        )
    return "hpu"


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
        size = world_size if world_size is not None else _env_world_size()
        return _DEFAULT_BACKENDS.get(resolved_device, "gloo") if size > 1 else None
    _check_backend(check_choice("--ddp_backend", requested or "", DDP_BACKENDS), resolved_device)
    return name


def _xccl_available(device: str) -> bool:
    is_xccl_available = getattr(torch.distributed, "is_xccl_available", lambda: False)
    return device == "xpu" and xpu_available() and is_xccl_available()


# backend → (does it run with this device here?, what it needs); "ccl" is checked by _import_ccl.
_BACKEND_NEEDS: dict[str, tuple[Callable[[str], bool], str]] = {
    "gloo": (lambda device: True, "nothing"),
    "nccl": (lambda device: device == "cuda" and torch.cuda.is_available(),
             "an NVIDIA GPU (--device cuda with torch.cuda.is_available())"),
    "mpi": (lambda device: torch.distributed.is_mpi_available(),
            "a torch built with MPI support (launching with mpirun does not need it)"),
    "xccl": (_xccl_available, "an Intel GPU (--device xpu with torch's XPU build)"),
    "hccl": (lambda device: device == "hpu" and importable("habana_frameworks.torch"),
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


def init_ccl_process_group(device: str, rank: int, world_size: int, *, timeout_s: int = 1800) -> None:
    """Start the ``ccl`` process group for a data-parallel run.

    transformers 5 and accelerate 1.x no longer set oneCCL up (their ``--ddp_backend``
    choices lack it); both reuse a process group that already exists. So a ``ccl`` run
    imports the bindings and starts the group here, before ``TrainingArguments`` is built,
    and leaves their ``ddp_backend`` unset. A single process only checks the import.

    Args:
        device: "cpu" or "xpu".
        rank: This process's global rank.
        world_size: Number of processes.
        timeout_s: ``--ddp_timeout``, seconds.

    Raises:
        ConfigError: ``device`` is not an Intel CPU or GPU.
        UnsupportedError: oneCCL's bindings do not import here.
    """
    resolve_ddp_backend("ccl", device, world_size=world_size)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "ccl", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )

