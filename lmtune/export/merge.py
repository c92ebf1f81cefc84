"""``lmtune merge``: fold a trained adapter into its base model and save a plain transformers model.

The output directory loads with ``AutoModelForCausalLM.from_pretrained`` (or the seq2seq
class) and no peft: safetensors weights, config, generation config, the tokenizer the
adapter was trained with, and the run's ``lmtune_args.json`` (so ``lmtune chat`` still
knows the training format). Its logits equal those of base + adapter through peft.

The base model is ``--model_name_or_path`` when given, else the one recorded in the
adapter's ``lmtune_args.json``, else peft's ``base_model_name_or_path``.

Example::

    lmtune merge --adapter ./out --output_dir ./merged
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


from lmtune.command_flags import parse_command_flags
from lmtune.errors import ConfigError
from lmtune.export.model_card import write_merged_model_card
from lmtune.model.base_model import resolve_base_model
from lmtune.model.inference import load_for_use
from lmtune.run_record import ARGS_FILE, write_json

logger = logging.getLogger(__name__)


@dataclass
class MergeArguments:
    adapter: str | None = field(default=None, metadata={"help": "Adapter directory written by lmtune finetune."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the merged model is written."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default: the one the adapter was trained on)."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Dtype of the saved weights (auto: the base checkpoint's own)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a non-empty --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code shipped with the base."})


def parse_merge_args(argv: list[str]) -> MergeArguments:
    """Parse ``lmtune merge`` flags.

    Raises:
        ConfigError: for unknown flags (with a did-you-mean), bad values, or a missing required flag.
    """
    args = parse_command_flags(MergeArguments, argv, "lmtune merge")
    missing = [f"--{name}" for name in ("adapter", "output_dir") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"lmtune merge needs {' and '.join(missing)}: "
                          "lmtune merge --adapter ADAPTER_DIR --output_dir OUT [--model_name_or_path BASE]")
    return args


def _adapter_config(adapter: Path) -> dict:
    file = adapter / "adapter_config.json"
    if not file.is_file():
        whole = " It holds a whole model already (e.g. --full_finetune output): use it as is." \
            if (adapter / "config.json").is_file() else ""
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there; expected an lmtune/PEFT adapter.{whole}")
    return json.loads(file.read_text(encoding="utf-8"))


def resolve_base(adapter: Path, base: str | None) -> str:
    """The base model: the flag, else the training run's record, else peft's record.

    Raises:
        ConfigError: when none of them names a base model.
    """
    return resolve_base_model(base, adapter, "lmtune merge")


def _check_mergeable(adapter_config: dict, adapter: Path) -> None:
    peft_type = adapter_config.get("peft_type", "?")
    if peft_type not in ("LORA", "IA3"):
        raise ConfigError(
            f"--adapter {adapter} is a {peft_type} adapter, which adds virtual tokens or attention prompts instead "
            "of weight deltas, so it cannot be folded into the weights (allowed: LoRA, DoRA, rsLoRA, IA3). "
            "Use it as is: lmtune chat --model_name_or_path BASE --adapter DIR."
        )


def _check_output_dir(out: Path, overwrite: bool, adapter: Path, base: str) -> None:
    if out.resolve() in (adapter.resolve(), Path(base).resolve()):
        raise ConfigError(f"--output_dir {out} is the adapter or base directory; choose a new directory.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; give a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {out} is not empty; choose a new directory, or pass --overwrite_output_dir.")


def merge_adapter(
    adapter: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA/IA3 adapter into its base model and save the result.

    Args:
        adapter: The adapter directory (``adapter_config.json`` + weights).
        output_dir: Where the merged model goes; must be empty unless ``overwrite``.
        base: The base model; by default the one the adapter records.
        dtype: ``auto`` (the base checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        overwrite: Write into a non-empty ``output_dir``.
        trust_remote_code: Allow model code shipped with the base.

    Returns:
        The output directory.

    Raises:
        ConfigError: a missing adapter or base, an adapter kind that cannot be merged, a
            non-empty output directory, or a merge that produced NaN/inf weights.
    """
    adapter, out = Path(adapter), Path(output_dir)
    adapter_config = _adapter_config(adapter)
    _check_mergeable(adapter_config, adapter)
    base = resolve_base(adapter, base)
    _check_output_dir(out, overwrite, adapter, base)
    logger.info("merge: loading the base model %s ...", base)  # each phase can take minutes on a large model
    # On the CPU, whatever the machine has: the merged weights go to disk, not to a device.
    model, tokenizer = load_for_use(base, adapter, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
    load_dtype = model.dtype
    logger.info("merge: folding the adapter %s into it ...", adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # peft's safe_merge found NaN/inf
        raise ConfigError(f"merging {adapter} into {base} failed: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
    logger.info("merge: saving the merged model to %s ...", out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    run_args = adapter / ARGS_FILE
    record = json.loads(run_args.read_text(encoding="utf-8")) if run_args.is_file() else {}
    record["merged"] = {"base": base, "adapter": str(adapter), "peft_type": adapter_config.get("peft_type"),
                        "dtype": str(load_dtype).removeprefix("torch.")}
    write_json(out / ARGS_FILE, record)
    write_merged_model_card(out, adapter)
    logger.info("merged %s into %s; wrote %s.", adapter, base, out)
    return out
