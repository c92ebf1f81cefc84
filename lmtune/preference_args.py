"""Arguments of a preference-tuning run (``finetune_dpo``, ``lmtune dpo``): the reference's ``dpo_clm.py`` flags.

The same parse as fine-tuning (``args.py``): lmtune's model, data and fine-tuning dataclasses,
one more for what preference tuning adds, and the unmodified ``TrainingArguments``, through
the same ``--config`` expansion, legacy-flag rewrites and unknown-flag errors. Where
``dpo_clm.py`` defaults differ from ``finetune_clm.py`` (``--validation_split_percentage 2``,
``--lora_all_linear True``), the parser's defaults are the DPO script's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import HfArgumentParser, TrainingArguments

from lmtune.args import (
    DataArguments,
    FinetuneArguments,
    ModelArguments,
    ParsedArgs,
    args_to_dict,
)
from lmtune.command_flags import raise_unknown_flags
from lmtune.argv import expand_config, rewrite_legacy_flags, runs_on_cpu
from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

LossType = Literal["sigmoid", "ipo", "hinge"]

# dpo_clm.py's defaults where they differ from finetune_clm.py's (it always trains: --do_train is on).
DPO_DEFAULTS = {"validation_split_percentage": 2, "lora_all_linear": True, "do_train": True}


@dataclass
class PreferenceArguments:
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO: strength of the pull towards the reference model (the KL weight). "
                  "ORPO: weight of the odds-ratio term beside the chosen answers' NLL."},
    )
    loss_type: LossType = field(
        default="sigmoid",
        metadata={"help": "DPO loss: sigmoid (the DPO paper's), ipo (squared, length-averaged log-ratios), "
                  "hinge (SLiC)."},
    )
    orpo: bool = field(
        default=False,
        metadata={"help": "Train with ORPO (odds-ratio preference optimization) instead of DPO: no reference "
                  "model; loss = NLL of the chosen answer - beta * log sigmoid(log odds ratio)."},
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Most prompt tokens; a longer prompt keeps its end (the question)."}
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Most tokens of prompt + answer; a longer answer is cut (its EOS kept)."},
    )
    pad_max: bool = field(default=False, metadata={"help": "Pad every batch to --max_length."})
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = field(
        default=None,
        metadata={"help": "Accepted for dpo_clm.py command lines; lmtune picks the weights' dtype from "
                  "--bf16/--fp16 (and what this CPU computes fast)."},
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "Start from this lmtune (PEFT) SFT adapter: it is trained further, and the frozen "
                  "SFT model (base + this adapter) is the DPO reference."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probabilities of every pair once before training "
                  "instead of at every step (one reference forward per pair in all)."},
    )


@dataclass
class PreferenceRun:
    """A parsed preference command line: the fine-tuning groups plus the preference flags."""

    args: ParsedArgs
    preference: PreferenceArguments


def build_preference_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, FinetuneArguments, PreferenceArguments, TrainingArguments),
        allow_abbrev=False,
    )
    parser.set_defaults(**DPO_DEFAULTS)
    return parser


def parse_preference_args(argv: list[str] | None = None) -> PreferenceRun:
    """Parse a ``dpo_clm.py``-style command line (and ``--config FILE``).

    Raises:
        ConfigError: on unknown flags (with a did-you-mean), bad values or an unreadable config file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _with_cpu_flag(rewrite_legacy_flags(expand_config(argv)))
    parser = build_preference_parser()
    try:
        model, data, finetune, preference, training, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except SystemExit as exc:  # argparse exits on bad values; a library must raise instead
        raise ConfigError(f"invalid arguments {' '.join(argv)} (see the message above).") from exc
    except ValueError as exc:  # TrainingArguments.__post_init__ checks
        raise ConfigError(str(exc)) from exc
    if remaining:
        raise_unknown_flags(parser, remaining)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        training.output_dir = None  # transformers would invent "trainer_output"; the reference requires it
    if model.use_auth_token:
        logger.warning("--use_auth_token is deprecated and ignored; pass --token instead.")
    if finetune.lora_target_modules and finetune.lora_all_linear and not _given(argv, "--lora_all_linear"):
        # dpo_clm.py ignored --lora_target_modules under its default --lora_all_linear True; naming
        # modules says which to adapt, so they win over the default (not over an explicit flag).
        logger.warning("--lora_target_modules given: adapting those, not every linear layer "
                       "(dpo_clm.py's default --lora_all_linear True).")
        finetune.lora_all_linear = False
    return PreferenceRun(ParsedArgs(model, data, finetune, training), preference)


def _with_cpu_flag(argv: list[str]) -> list[str]:
    """``--use_cpu True`` added when the run will be on the CPU, before TrainingArguments checks ``--bf16``."""
    if _given(argv, "--use_cpu"):
        return argv
    device = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    device.add_argument("--device", default="auto")
    return argv + ["--use_cpu", "True"] if runs_on_cpu(device.parse_known_args(argv)[0].device) else argv


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def preference_problems(run: PreferenceRun) -> list[str]:
    """Cross-field problems of the preference flags (``validate_args`` checks the rest)."""
    pref, ft, data = run.preference, run.args.finetune, run.args.data
    problems = []
    if pref.beta <= 0:
        problems.append(f"--beta must be > 0 (got {pref.beta})")
    if pref.max_prompt_length <= 0:
        problems.append(f"--max_prompt_length must be > 0 (got {pref.max_prompt_length})")
    if pref.max_length <= pref.max_prompt_length:
        problems.append(f"--max_length ({pref.max_length}) must exceed --max_prompt_length "
                        f"({pref.max_prompt_length}): the answers need room")
    if pref.orpo and pref.loss_type != "sigmoid":
        problems.append(f"--loss_type {pref.loss_type} is a DPO loss; --orpo has its own: drop one of the two")
    if pref.orpo and pref.precompute_ref_log_probs:
        problems.append("--precompute_ref_log_probs: ORPO has no reference model; drop the flag")
    if ft.full_finetune and not pref.orpo and not pref.precompute_ref_log_probs:
        problems.append("--full_finetune DPO needs the reference's log-probabilities from before training: add "
                        "--precompute_ref_log_probs (lmtune keeps no second copy of the model)")
    if pref.adapter and ft.full_finetune:
        problems.append("--adapter trains that adapter further; --full_finetune trains every weight: give one")
    if data.dataset_concatenation:
        problems.append("--dataset_concatenation packs SFT samples; preference pairs are never packed")
    if ft.task != "completion":
        problems.append(f"--task {ft.task}: preference data is recognized by its fields; leave --task out")
    return problems


def preference_args_to_dict(run: PreferenceRun) -> dict[str, dict[str, Any]]:
    """The resolved arguments as JSON-ready dicts (``args_to_dict`` plus the ``preference`` group)."""
    out = args_to_dict(run.args)
    out["preference"] = {f.name: getattr(run.preference, f.name) for f in fields(run.preference)}
    return out
