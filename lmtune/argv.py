"""argv before parsing: ``--config`` files, the reference's legacy spellings, the CPU flag.

The reference's command lines predate flags that transformers has renamed or dropped;
they are rewritten here, from one table, with one notice each, so that ``args.parse_flags``
sees only flags the installed transformers knows. A config file (YAML or JSON, also the
reference's ``finetune_clm.py args.json`` form) becomes argv too, with command-line flags
overriding it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)


# Flags of the reference that transformers has renamed or dropped since: old spelling -> rewrite.
# A rewrite maps (flag, value or None) to the replacement argv pieces.
LEGACY_FLAGS: dict[str, tuple[str, str]] = {
    "--no_cuda": ("--use_cpu", "renamed --use_cpu in transformers 4.45"),
    "--evaluation_strategy": ("--eval_strategy", "renamed --eval_strategy in transformers 4.41"),
    "--group_by_length": ("--train_sampling_strategy", "became --train_sampling_strategy group_by_length"),
    "--gradient_checkpointing": ("--activation_checkpointing", "renamed --activation_checkpointing in transformers 5"),
    "--warmup_ratio": ("--warmup_steps", "merged into --warmup_steps in transformers 5: a value below 1 is a ratio"),
}
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _accelerator_present() -> bool:
    from lmtune.model.inference import detect_device  # imports torch: only when a device must be resolved

    return detect_device() in ("cuda", "xpu")


def runs_on_cpu(device: str) -> bool:
    """Whether ``--device`` puts the run on the CPU: ``cpu``, or ``auto``/``hpu`` on a machine without
    CUDA or XPU (a Gaudi run parses as a CPU one, so that it can stop with Habana's own message
    instead of a bf16 error)."""
    device = device.strip("\"'").lower()
    return device == "cpu" or (device in ("auto", "hpu") and not _accelerator_present())


def rewrite_legacy_flags(argv: list[str], *, notices: list[str] | None = None) -> list[str]:
    """Rewrite the reference's spellings (``LEGACY_FLAGS``, ``--ddp_backend ccl``) with one notice each.

    Args:
        argv: The arguments.
        notices: Collects the notices instead of logging them.
    """
    def notice(message: str) -> None:
        if notices is None:
            logger.warning(message)
        else:
            notices.append(message)

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, _, inline = arg.partition("=")
        if flag == "--ddp_backend":
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            if value.lower() == "ccl":
                notice("--ddp_backend ccl: transformers no longer lists oneCCL; lmtune sets it up itself.")
                out += ["--use_oneccl", "True"]
                i += 1 if inline else 2
                continue
        if flag not in LEGACY_FLAGS:
            out.append(arg)
            i += 1
            continue
        new_flag, why = LEGACY_FLAGS[flag]
        notice(f"{flag} is a legacy spelling ({why}); using {new_flag}.")
        value = inline or None
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        i += 1
        if flag == "--group_by_length":
            if value is None or _BOOL_WORDS.get(value.lower(), True):
                out += [new_flag, "group_by_length"]
            continue
        out += [new_flag] + ([value] if value is not None else [])
    return out


def config_to_argv(config: dict[str, Any], source: str = "config") -> list[str]:
    """Turn a flat ``{flag: value}`` mapping (a YAML/JSON config, or API keyword arguments) into argv.

    Raises:
        ConfigError: if a value is a nested mapping, which no flag accepts.
    """
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' is a mapping; every setting must be a flat value or a list.")
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        else:
            argv.append(str(value))
    return argv


def _load_config_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise different types; both mean "not parseable"
        raise ConfigError(f"--config {path}: not valid {file.suffix.lstrip('.') or 'JSON'}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    return config_to_argv(data, source=path)


def expand_config(argv: list[str]) -> list[str]:
    """Put ``--config FILE`` settings first so that flags on the command line override them."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        return _load_config_file(argv[0])  # the reference's `finetune_clm.py args.json` form
    argv = [piece for arg in argv for piece in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a file path: --config recipe.yaml")
    return _load_config_file(argv[i + 1]) + argv[:i] + argv[i + 2 :]
