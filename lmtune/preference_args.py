"""Arguments of a preference-tuning run (``finetune_dpo``, ``lmtune dpo``): the reference's ``dpo_clm.py`` flags.

The same parse as fine-tuning (``args.py``): lmtune's model, data and fine-tuning dataclasses,
one more for what preference tuning adds, and the unmodified ``TrainingArguments``, through
the same ``--config`` expansion, legacy-flag rewrites and unknown-flag errors. Where
``dpo_clm.py`` defaults differ from ``finetune_clm.py`` (``--validation_split_percentage 2``,
``--lora_all_linear True``), the parser's defaults are the DPO script's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import HfArgumentParser

from lmtune.args import ParsedArgs, ParsedFlags, args_to_dict, build_args, build_extra, build_parser, parse_flags

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
    """``lmtune finetune``'s parser (``args.build_parser``) with the preference flags and ``dpo_clm.py``'s
    defaults, over plain ``TrainingArguments``: preference tuning is for causal models."""
    return build_parser("lmtune dpo", extra=(PreferenceArguments,), defaults=DPO_DEFAULTS, seq2seq=False)


def build_preference_run(flags: ParsedFlags) -> PreferenceRun:
    """The typed arguments of a preference run from its one parse (``args.build_args`` plus the preference flags).

    Raises:
        ConfigError: for what ``TrainingArguments`` rejects.
    """
    args = build_args(flags, seq2seq=False)
    finetune = args.finetune
    if finetune.lora_target_modules and finetune.lora_all_linear and "lora_all_linear" not in flags.given:
        # dpo_clm.py ignored --lora_target_modules under its default --lora_all_linear True; naming
        # modules says which to adapt, so they win over the default (not over an explicit flag).
        logger.warning("--lora_target_modules given: adapting those, not every linear layer "
                       "(dpo_clm.py's default --lora_all_linear True).")
        finetune.lora_all_linear = False
    return PreferenceRun(args, build_extra(flags, PreferenceArguments))


def parse_preference_args(argv: list[str] | None = None) -> PreferenceRun:
    """Parse a ``dpo_clm.py``-style command line (and ``--config FILE``), without setting the process up.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: on unknown flags (with a did-you-mean), bad values or an unreadable config file.
    """
    return build_preference_run(parse_flags(argv, parser=build_preference_parser()))


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
