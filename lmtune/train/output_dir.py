"""The run's ``--output_dir``: never clobber what the user owns, resume what lmtune left.

Rules:
- empty or missing: a fresh run;
- holds an unfinished earlier lmtune run (``lmtune_args.json``, no ``train_results.json``) with a
  complete checkpoint: resume from the newest complete one, and say so; without one, start anew;
- holds a finished lmtune run, or anything else: refuse without ``--overwrite_output_dir``;
- ``--overwrite_output_dir`` on an earlier lmtune run removes that run's checkpoints and result
  files (``clear_earlier_run``, after the new data passed its checks); on any other directory it
  removes nothing and writes beside what is there;
- nothing outside ``output_dir`` is ever touched.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError
from lmtune.run_record import ARGS_FILE, checkpoint_step
from lmtune.train.checkpointing import is_complete_checkpoint, latest_complete_checkpoint, remove_staging_dirs

logger = logging.getLogger(__name__)

# Written only when training finished: such a run is neither resumed nor overwritten unasked.
FINISHED_MARKER = "train_results.json"
# The result files of a run, removed with its checkpoints by --overwrite_output_dir.
RESULT_FILES = (FINISHED_MARKER, "all_results.json", "eval_results.json", "trainer_state.json")
# Arguments that may differ between an interrupted run and its resumption without changing the result.
RESUME_NEUTRAL_ARGS = {
    "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "disable_tqdm", "report_to",
    "log_level", "log_level_replica", "logging_first_step", "save_total_limit", "dataloader_num_workers",
}


def prepare_output_dir(
    output_dir: str,
    *,
    overwrite: bool,
    resume_from_checkpoint: str | None,
    current_args: dict[str, Any] | None = None,
) -> str | None:
    """Decide what a run does with its output directory, before anything loads.

    Args:
        output_dir: ``--output_dir``.
        overwrite: ``--overwrite_output_dir``.
        resume_from_checkpoint: ``--resume_from_checkpoint``: a checkpoint directory, or
            ``true``/``latest`` for the newest complete checkpoint in ``output_dir``.
        current_args: This run's resolved arguments (``args_to_dict``), compared with the
            interrupted run's when resuming; differences are reported.

    Returns:
        The checkpoint to resume from, or None for a fresh run.

    Raises:
        ConfigError: when the directory holds files lmtune must not write over, or the
            checkpoint to resume from is missing or incomplete.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file; give a directory.")
    occupied = path.is_dir() and any(path.iterdir())
    earlier_run = (path / ARGS_FILE).is_file()
    if occupied and not earlier_run and not overwrite:
        raise ConfigError(
            f"--output_dir {output_dir} is not empty and holds files that are not from lmtune. "
            "Choose a new directory, or pass --overwrite_output_dir to write into it (nothing there is deleted)."
        )
    if earlier_run:
        for stale in remove_staging_dirs(path):
            logger.warning("removed %s, left by a checkpoint save that was interrupted.", stale)
    if resume_from_checkpoint:
        checkpoint = _named_checkpoint(output_dir, resume_from_checkpoint)
        _report_resume(checkpoint, output_dir, current_args)
        return str(checkpoint)
    if not occupied:
        return None
    if overwrite:
        if not earlier_run:
            logger.warning("--overwrite_output_dir: writing into %s beside the files already there.", output_dir)
        return None  # the earlier run is cleared by clear_earlier_run once the data has been checked
    if (path / FINISHED_MARKER).exists():
        raise ConfigError(
            f"--output_dir {output_dir} holds a finished lmtune run ({FINISHED_MARKER}). Choose a new directory, "
            "pass --overwrite_output_dir to start over, or --resume_from_checkpoint CHECKPOINT to train on."
        )
    checkpoint = latest_complete_checkpoint(path)
    if checkpoint is None:
        logger.warning("%s holds an earlier lmtune run that stopped before its first complete checkpoint; "
                       "starting anew.", output_dir)
        return None
    _report_resume(checkpoint, output_dir, current_args)
    return str(checkpoint)


def _named_checkpoint(output_dir: str, value: str) -> Path:
    """Resolve ``--resume_from_checkpoint``: a directory, or true/latest for the newest complete one."""
    if value.lower() in ("true", "latest", "last"):
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume_from_checkpoint {value}: {output_dir} holds no complete checkpoint.")
        return checkpoint
    checkpoint = Path(value)
    if not checkpoint.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")
    if not is_complete_checkpoint(checkpoint):
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(
                f"--resume_from_checkpoint {value}: not a complete checkpoint (no trainer_state.json); "
                "give a checkpoint-N directory written by a training run."
            )
        logger.warning("%s has no lmtune completion marker (written by another tool?); resuming from it as named.",
                       checkpoint)
    return checkpoint


def _report_resume(checkpoint: Path, output_dir: str, current_args: dict[str, Any] | None) -> None:
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    of = f" of {state['max_steps']}" if state.get("max_steps") else ""
    logger.warning("resuming from %s (step %s%s); pass --overwrite_output_dir to start fresh instead.",
                   checkpoint, state.get("global_step", checkpoint_step(checkpoint)), of)
    saved_file = Path(output_dir) / ARGS_FILE
    if current_args is not None and saved_file.is_file():
        saved = json.loads(saved_file.read_text(encoding="utf-8")).get("args", {})
        changed = changed_args(saved, current_args)
        if changed:
            logger.warning("the interrupted run used different arguments, so the result will differ from an "
                           "uninterrupted run: %s.", "; ".join(changed))


def changed_args(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """``--flag: old -> new`` for every argument that differs, except those that cannot change the result."""
    changes = []
    for group, values in current.items():
        before = saved.get(group, {})
        for name, value in values.items():
            old = before.get(name, value)
            if name not in RESUME_NEUTRAL_ARGS and json.dumps(old, default=str) != json.dumps(value, default=str):
                changes.append(f"--{name}: {old} -> {value}")
    return changes


def clear_earlier_run(output_dir: str) -> None:
    """For ``--overwrite_output_dir``: remove an earlier lmtune run's checkpoints and result files.

    Called once the new run's data has passed its checks, so a typo does not cost the old
    checkpoints. Nothing else is removed, and nothing at all from a directory lmtune did not write.
    """
    path = Path(output_dir)
    if not (path / ARGS_FILE).is_file():
        return
    for stale in sorted(path.iterdir()):
        ours = (stale.is_dir() and not stale.is_symlink() and checkpoint_step(stale) is not None) or (
            stale.name in RESULT_FILES and stale.is_file()
        )
        if ours:
            logger.warning("--overwrite_output_dir: removing the earlier run's %s.", stale)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
