"""DeepSpeed ZeRO on the machines lmtune runs on: its process group on CPU, whole weights for probes.

Stage contract: :func:`init_deepspeed_process_group` runs before ``TrainingArguments``
is built (``train.distributed.setup_process``); :func:`whole_weights` wraps the
checks that run the loaded model before training (embedding size, packing probe,
adapter smoke test), which under ZeRO-3 would otherwise see empty, partitioned tensors.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from lmtune.errors import UnsupportedError

_DEEPSPEED_FIX = (
    "Fix: pip install deepspeed (DS_BUILD_OPS=0 is enough: on CPU its kernels are built when first "
    "used; on Gaudi install Habana's DeepSpeed fork instead), or drop --deepspeed: plain data "
    "parallelism through torchrun or mpirun needs nothing extra."
)


def init_deepspeed_process_group(
    device: str, rank: int, world_size: int, *, backend: str | None = None, timeout_s: int = 1800
) -> None:
    """Check that DeepSpeed imports and, on CPU, start its process group.

    On a CPU run ``TrainingArguments`` (``use_cpu``) has accelerate start a plain gloo
    group that DeepSpeed's own communication layer does not know about, so ZeRO would
    count one process. Starting the group through ``deepspeed.init_distributed`` first
    lets both share it. On accelerators accelerate already starts it through DeepSpeed.

    Args:
        device: The resolved device.
        rank: This process's global rank.
        world_size: Number of processes.
        backend: "ccl" for oneCCL; otherwise gloo.
        timeout_s: ``--ddp_timeout``, seconds.

    Raises:
        UnsupportedError: deepspeed does not import here.
    """
    try:
        import deepspeed
    except ImportError as err:  # any failure while importing it means --deepspeed cannot run
        raise UnsupportedError(f"--deepspeed needs the deepspeed package, which does not import here ({err}). "
                               f"{_DEEPSPEED_FIX}") from err
    if device != "cpu" or torch.distributed.is_initialized():
        return
    if world_size == 1:  # no launcher: DeepSpeed still wants a process group, of one, as a launcher makes it
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(name, value)
    deepspeed.init_distributed(dist_backend="ccl" if backend == "ccl" else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module) -> Iterator[None]:
    """Let code outside the DeepSpeed engine run ``model`` under ZeRO-3.

    ZeRO-3 loads each weight partitioned across the ranks (``deepspeed.zero.Init``), so
    every rank holds a slice and a plain forward pass fails. Inside this context each
    rank holds the whole weights (one full copy of the model per process, for as long
    as the context lasts); they are partitioned again on exit, changes discarded. Outside
    ZeRO-3 it does nothing.
    """
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
