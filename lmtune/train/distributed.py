"""Launcher environment → torch.distributed settings; what a process settles before training.

Stage contract: every entry point calls :func:`setup_process` before it builds
``TrainingArguments`` (which starts accelerate and, under a launcher, the process
group). It checks ``--device`` (``lmtune.train.devices``), then
:func:`apply_launcher_env` reads what the launcher exported (torchrun, MPICH /
Intel MPI / Hydra, Open MPI), writes the variables ``torch.distributed`` reads
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
picks a per-rank thread count; then the ``--ddp_backend`` is checked, and a
``ccl`` process group started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from lmtune.errors import ConfigError
from lmtune.train.devices import DDP_BACKENDS, check_device, init_ccl_process_group, resolve_ddp_backend
from lmtune.train.zero import init_deepspeed_process_group

logger = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"
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
        missing = [n[0] for n, v in zip(names[1:], (size, local_rank, local_size), strict=True) if v is None]
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


def setup_process(
    device: str = "auto",
    *,
    use_habana: bool = False,
    use_lazy_mode: bool = False,
    ddp_backend: str | None = None,
    ddp_timeout: int = 1800,
    deepspeed: str | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> DistributedInfo:
    """Settle everything that must precede ``TrainingArguments``, in the order it must happen.

    Building ``TrainingArguments`` starts accelerate, which under a launcher starts the
    process group from RANK/WORLD_SIZE/MASTER_ADDR. So first the device is checked (a
    Gaudi command line without Habana's software stops here, before anything loads), then
    the launcher's environment is mapped (:func:`apply_launcher_env`), then the DDP
    backend: ``ccl`` imports oneCCL's bindings and starts its group here
    (:func:`init_ccl_process_group`); the others are checked here and started by accelerate.
    With ``--deepspeed`` on CPU the group is started through DeepSpeed
    (:func:`init_deepspeed_process_group`), so that ZeRO sees every rank.

    Args:
        device: ``--device``.
        use_habana: ``--use_habana``.
        use_lazy_mode: ``--use_lazy_mode``.
        ddp_backend: ``--ddp_backend`` as typed, or None.
        ddp_timeout: ``--ddp_timeout``, seconds (for the groups started here).
        deepspeed: ``--deepspeed`` config file or JSON, or None.
        environ: The environment to read and update, usually ``os.environ``.

    Returns:
        Where this process sits in the job.

    Raises:
        ConfigError: Unknown device or backend, inconsistent launcher variables, or a
            multi-node MPI job without MASTER_ADDR.
        UnsupportedError: The device, the backend's library or DeepSpeed is missing here.
    """
    resolved = check_device(device, use_habana=use_habana, use_lazy_mode=use_lazy_mode)
    info = apply_launcher_env(environ)
    backend = (ddp_backend or "").strip().lower()
    if backend == "ccl":
        resolve_ddp_backend("ccl", resolved, world_size=info.world_size)
    elif backend in DDP_BACKENDS:  # transformers checks the rest of its own choices
        resolve_ddp_backend(backend, resolved, world_size=info.world_size)
    if deepspeed:
        init_deepspeed_process_group(resolved, info.rank, info.world_size, backend=backend, timeout_s=ddp_timeout)
    elif backend == "ccl":
        init_ccl_process_group(resolved, info.rank, info.world_size, timeout_s=ddp_timeout)
    return info




def fsdp_notice(fsdp: bool, use_cpu: bool) -> str | None:
    """Why ``--fsdp`` will not shard this run, or None when it will.

    accelerate builds its FSDP plugin only for accelerator process groups (GPU, XPU,
    HPU, NPU, ...); a CPU run's Trainer wraps the model in plain DDP instead, so every
    rank holds the whole model. Results are the same; memory is not.
    """
    if not (fsdp and use_cpu):
        return None
    import accelerate

    return (f"--fsdp does not shard on CPU: accelerate {accelerate.__version__} builds FSDP only for GPU, XPU "
            "and HPU process groups, so this run uses DDP and every rank holds the whole model. To shard "
            "a model across CPU processes use --deepspeed with a ZeRO-3 config (examples/ds_zero3_config.json).")


__all__ = [
    "DistributedInfo", "apply_launcher_env", "check_device", "fsdp_notice", "is_main_process", "map_launcher_env",
    "resolve_ddp_backend", "setup_process", "threads_per_rank",
]
