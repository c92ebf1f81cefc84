"""The run's ``--output_dir``: never clobber what the user owns, resume what lmtune left.

Rules:
- empty or missing: a fresh run;
- holds an earlier lmtune run (``lmtune_args.json``) with checkpoints: resume from the newest
  complete one, and say so; ``--overwrite_output_dir`` starts fresh instead;
- holds an earlier lmtune run that finished, or anything else: refuse without
  ``--overwrite_output_dir``;
- nothing outside ``output_dir`` is ever touched.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

ARGS_FILE = "lmtune_args.json"
LIBRARIES = ("lmtune", "torch", "transformers", "peft", "datasets", "accelerate", "tokenizers", "safetensors")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def prepare_output_dir(output_dir: str, *, overwrite: bool, resume_from_checkpoint: str | None) -> str | None:
    """Decide what a run does with its output directory, before anything loads.

    Returns:
        The checkpoint to resume from, or None for a fresh run.

    Raises:
        ConfigError: when the directory holds files lmtune must not write over.
    """
    path = Path(output_dir)
    if resume_from_checkpoint:
        if not Path(resume_from_checkpoint).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint directory.")
        return resume_from_checkpoint
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file; give a directory.")
    if not path.exists() or not any(path.iterdir()):
        return None
    earlier_run = (path / ARGS_FILE).is_file()
    checkpoint = get_last_checkpoint(str(path)) if earlier_run else None
    if overwrite:
        if earlier_run:
            for stale in path.glob("checkpoint-*"):
                logger.warning("--overwrite_output_dir: removing the earlier run's %s.", stale)
                shutil.rmtree(stale)
        return None
    if checkpoint:
        logger.warning("resuming the interrupted run in %s from %s.", output_dir, checkpoint)
        return checkpoint
    if earlier_run and not (path / "train_results.json").exists():
        logger.warning("%s holds an earlier lmtune run that stopped before its first checkpoint; starting anew.",
                       output_dir)
        return None
    what = "a finished lmtune run" if earlier_run else "files that are not from lmtune"
    raise ConfigError(
        f"--output_dir {output_dir} is not empty: it holds {what}. Choose a new directory, "
        "or pass --overwrite_output_dir to write into it."
    )


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_run_args(output_dir: str, resolved: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Save the resolved arguments and library versions, so merge, export and chat can read them back."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    data = {"args": resolved, "versions": library_versions(), **(extra or {})}
    write_json(path / ARGS_FILE, data)
    return path / ARGS_FILE


def read_run_args(output_dir: str) -> dict[str, Any]:
    """The resolved arguments of an earlier run, as saved by ``write_run_args``.

    Raises:
        ConfigError: if the directory holds no lmtune run.
    """
    file = Path(output_dir) / ARGS_FILE
    if not file.is_file():
        raise ConfigError(f"{output_dir} holds no {ARGS_FILE}: it is not the output of an lmtune run.")
    return json.loads(file.read_text(encoding="utf-8"))
