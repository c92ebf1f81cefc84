"""Which base model an adapter belongs to: recorded once when training starts, read back by chat, eval and merge.

A local base model is recorded by its absolute path (``absolute_model_path``), so that an adapter
trained with ``--model_name_or_path ./stories260K`` still finds its base when merged or chatted
with from another directory; a hub id stays a hub id. The record is the run's
``lmtune_args.json`` (``lmtune.run_record``), else peft's ``adapter_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmtune.errors import ConfigError
from lmtune.run_record import recorded_base_model as recorded_run_base

ADAPTER_CONFIG_FILE = "adapter_config.json"


def absolute_model_path(name_or_path: str | None) -> str | None:
    """An existing local path made absolute (transformers loads it locally); anything else unchanged."""
    if not name_or_path or not Path(name_or_path).expanduser().exists():
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def recorded_base_model(adapter: str | Path) -> str | None:
    """The base model an adapter directory records: its run's (or, for a checkpoint, its parent run's), else peft's."""
    recorded = recorded_run_base(adapter)
    config = Path(adapter) / ADAPTER_CONFIG_FILE
    if recorded or not config.is_file():
        return recorded
    value = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def resolve_base_model(base: str | None, adapter: str | Path | None, command: str) -> str:
    """``--model_name_or_path`` when given, else the base model ``--adapter`` records.

    Raises:
        ConfigError: when neither names a base model.
    """
    if base:
        return base
    recorded = recorded_base_model(adapter) if adapter else None
    if recorded:
        return recorded
    if adapter:
        raise ConfigError(f"--adapter {adapter} does not record its base model; pass --model_name_or_path BASE.")
    raise ConfigError(f"{command}: --model_name_or_path is required: the base model, unless --adapter names the "
                      "output of an lmtune run, which records it.")
