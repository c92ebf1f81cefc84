"""Checkpoints that are complete or absent, and a clean stop on Ctrl-C / SIGTERM.

Contract:
- A directory ``output_dir/checkpoint-N`` holding ``COMPLETE_MARKER`` is complete. The Trainer
  writes each checkpoint into ``output_dir/.staging-checkpoint-N/checkpoint-N``
  (``save_checkpoint_atomically``); only once every
  file is written and synced is the marker added and the directory renamed into place. A rename
  within one file system is atomic, so a kill at any moment leaves either the old set of
  checkpoints or the new one, plus at most a staging directory that the next run removes.
- A failed save (full disk, unwritable directory) raises ``CheckpointSaveError`` naming the free
  space and the last complete checkpoint, which is left as it was.
- ``StopOnSignal`` turns SIGINT/SIGTERM into "finish this optimizer step, save, stop"; a second
  signal acts at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lmtune.errors import LmtuneError
from lmtune.run_record import checkpoint_step

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "lmtune_checkpoint.json"
STAGING_PREFIX = ".staging-"


class CheckpointSaveError(LmtuneError, OSError):
    """A checkpoint could not be written; the previous complete one is untouched."""


def is_complete_checkpoint(path: str | Path) -> bool:
    """True when lmtune finished writing this checkpoint (its marker is present)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None.

    Directories named ``checkpoint-N`` without the marker (written by something else, or by a
    save that never finished) are passed over with a warning, never deleted.
    """
    path = Path(output_dir)
    if not path.is_dir():
        return None
    found = sorted((step, p) for p in path.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None)
    for step, candidate in reversed(found):
        if is_complete_checkpoint(candidate):
            return candidate
        logger.warning("%s is incomplete (no %s); not resuming from it.", candidate, COMPLETE_MARKER)
    return None


def remove_staging_dirs(output_dir: str | Path) -> list[Path]:
    """Delete the leftovers of saves that were killed midway (only ``.staging-checkpoint-*`` in output_dir)."""
    removed = []
    path = Path(output_dir)
    if path.is_dir():
        for stale in path.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
                removed.append(stale)
    return removed


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` to disk, so the rename publishes real bytes."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(staged: Path, final: Path, step: int) -> Path:
    """Mark a fully written checkpoint complete and move it to its final name in one rename.

    An existing ``final`` (an older save of the same step, e.g. after a resume) is moved aside
    first, under a staging name that the next run cleans up, and removed once the new one is
    in place.
    """
    (staged / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
    _fsync_tree(staged)
    previous = None
    if final.exists():
        previous = final.with_name(f"{STAGING_PREFIX}{final.name}.old")
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    staged.rename(final)
    _fsync_dir(final.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def _is_disk_problem(err: BaseException) -> bool:
    """torch.save reports a full disk as a RuntimeError and safetensors as its own type: read the text."""
    chain: BaseException | None = err
    while chain is not None:
        text = str(chain).lower()
        if isinstance(chain, OSError) or any(s in text for s in ("space", "write failed", "os error", "quota")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def save_failure(err: BaseException, output_dir: Path, name: str) -> CheckpointSaveError:
    """The message for a failed save: what failed, the free space, and what is safe."""
    free = shutil.disk_usage(output_dir).free
    last = latest_complete_checkpoint(output_dir)
    kept = f"the last complete checkpoint, {last.name}, is intact" if last else "no earlier checkpoint exists"
    return CheckpointSaveError(
        f"saving {name} into {output_dir} failed: {type(err).__name__}: {err}. Free space there: "
        f"{free / 2**20:.1f} MiB. The partial save was removed and {kept}. Free disk space (or lower "
        "--save_total_limit) and run the same command again to resume."
    )


def save_checkpoint_atomically(trainer, run_dir: Path, stock_save: Callable[[], None]) -> None:
    """Run the Trainer's own checkpoint save into a staging directory, then publish it with one rename.

    Calling the stock save (not re-implementing it) keeps every file the Trainer writes (model,
    optimizer, scheduler, RNG, trainer state) while changing only where it lands first: while
    ``stock_save`` runs, ``trainer.staging_run_dir`` names the staging directory, which the
    Trainer's ``_get_output_dir`` returns (``train/trainer.py``), the one place its save asks.

    Args:
        trainer: The Trainer saving (its state, arguments and accelerator are read).
        run_dir: Where ``checkpoint-N`` is published.
        stock_save: The stock ``_save_checkpoint`` of this step, bound to its arguments.

    Raises:
        CheckpointSaveError: when the disk is full or unwritable (the partial save removed).
    """
    args = trainer.args
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging = run_dir / f"{STAGING_PREFIX}{name}"
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.staging_run_dir = str(staging)
    try:
        stock_save()
        _fix_best_checkpoint_path(trainer, staging / name, run_dir / name)
        trainer.accelerator.wait_for_everyone()  # every rank's RNG file is in place
        if args.should_save:
            commit_checkpoint(staging / name, run_dir / name, trainer.state.global_step)
            shutil.rmtree(staging, ignore_errors=True)
            # The stock save rotated inside the staging directory; rotate the real one.
            rotate_checkpoints(str(run_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
    except Exception as err:
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if _is_disk_problem(err):
            raise save_failure(err, run_dir, name) from err
        raise
    finally:
        trainer.staging_run_dir = None
    trainer.accelerator.wait_for_everyone()


def _fix_best_checkpoint_path(trainer, staged: Path, final: Path) -> None:
    """The stock save records the best checkpoint by the path it wrote; point it at the final one."""
    state = trainer.state
    if state.best_model_checkpoint and Path(state.best_model_checkpoint) == staged:
        state.best_model_checkpoint = str(final)
        if trainer.args.should_save:
            state.save_to_json(str(staged / "trainer_state.json"))


class StopOnSignal(TrainerCallback):
    """Stop at the next optimizer-step boundary after SIGINT/SIGTERM, saving a checkpoint first.

    Use ``with stopper.installed(): trainer.train()``. After the first signal the previous
    handlers are back, so a second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: Ctrl-C/SIGTERM will not save a checkpoint first.")
            yield self
            return
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()
        logger.warning(
            "%s received: finishing the current step, saving a checkpoint, then stopping "
            "(send it again to stop at once, without saving).", signal.Signals(signum).name,
        )

    def _stop_requested(self, args: TrainingArguments) -> bool:
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others wait forever in the next all-reduce.
            tensor = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stop_requested(args):
            self.received = self.received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        return control

    def interruption(self, state: TrainerState, output_dir: str) -> KeyboardInterrupt:
        """What to raise after ``train()`` returned because of a signal."""
        name = signal.Signals(self.received).name if self.received else "a signal"
        last = latest_complete_checkpoint(output_dir)
        saved = f"{last} is saved" if last else "no checkpoint was saved"
        message = (f"training stopped by {name} at step {state.global_step}; {saved}. "
                   "Run the same command again to resume from it.")
        logger.warning(message)
        return KeyboardInterrupt(message)


def train_and_save(
    trainer, stopper: StopOnSignal, checkpoint: str | None,
    train_metrics: Callable[[dict[str, float]], dict[str, Any]],
) -> dict[str, Any]:
    """Train (resuming from ``checkpoint``), stop cleanly on a signal, then save the model, the
    metrics and the Trainer state the way the reference's scripts do.

    Args:
        trainer: A Trainer with ``stopper`` among its callbacks.
        train_metrics: Turns ``train()``'s metrics into the ones reported (the command's own additions).

    Returns:
        The reported training metrics (also in ``train_results.json``).

    Raises:
        KeyboardInterrupt: a signal stopped training (after a checkpoint was saved).
    """
    with stopper.installed():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.received is not None:
        raise stopper.interruption(trainer.state, trainer.args.output_dir)
    trainer.save_model()
    metrics = train_metrics(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics
