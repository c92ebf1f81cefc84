"""What a run wrote about itself: ``lmtune_args.json`` in its output directory.

Contract: training writes the resolved arguments and library versions once (``write_run_args``);
``lmtune chat``, ``serve``, ``merge`` and the model card read them back (``read_run_args``,
``read_training_settings``, ``recorded_base_model``) to prompt in the format the model was
trained on and to find its base model. A ``checkpoint-N`` directory holds no record of its
own: its run's, one level up, applies. This module sits below ``train``, ``chat`` and
``export`` so that none of them imports another to read the record.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtune.errors import ConfigError

ARGS_FILE = "lmtune_args.json"
LIBRARIES = ("lmtune", "torch", "transformers", "peft", "datasets", "accelerate", "tokenizers", "safetensors")


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-N`` directory name, or None for any other name."""
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit() else None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


def _run_dir(directory: str | Path | None) -> Path | None:
    """The directory whose record applies to ``directory`` (its run's, for a checkpoint), or None."""
    if not directory:
        return None
    path = Path(directory)
    if not (path / ARGS_FILE).is_file() and checkpoint_step(path) is not None:
        path = path.parent
    return path if (path / ARGS_FILE).is_file() else None


def read_training_settings(directory: str | Path | None) -> dict[str, Any]:
    """The chat template and task an lmtune run used, from its ``lmtune_args.json`` ({} if none)."""
    path = _run_dir(directory)
    if path is None:
        return {}
    finetune = read_run_args(str(path)).get("args", {}).get("finetune", {})
    return {"chat_template": finetune.get("chat_template"), "task": finetune.get("task")}


def recorded_base_model(directory: str | Path | None) -> str | None:
    """The ``--model_name_or_path`` the run that wrote ``directory`` trained, or None."""
    path = _run_dir(directory)
    if path is None:
        return None
    return read_run_args(str(path)).get("args", {}).get("model", {}).get("model_name_or_path") or None
