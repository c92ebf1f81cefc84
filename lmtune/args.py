"""Command-line and config-file arguments: the reference's flags, parsed the Hugging Face way.

Three dataclasses of our own (model, data, fine-tuning) plus the unmodified
``transformers.TrainingArguments`` (``Seq2SeqTrainingArguments`` for seq2seq),
parsed by ``HfArgumentParser``. Flags that transformers has renamed since the
reference was written go through ``LEGACY_FLAGS``, one table, with one notice.
Every cross-field check lives in ``validate_args`` and runs before anything loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

PeftMethod = Literal["lora", "ptun", "prefix", "prompt", "llama_adapter", "ia3"]
Task = Literal["completion", "chat", "summarization", "code-generation"]
Device = Literal["auto", "cpu", "cuda", "xpu", "hpu"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local model directory or hub id: weights, config and tokenizer."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config to use instead of the model's own."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory, hub id or tokenizer.json file (MPT: gpt-neox-20b)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision: branch, tag or commit."})
    token: str | None = field(default=None, metadata={"help": "Hub access token for gated or private models."})
    use_auth_token: bool = field(default=False, metadata={"help": "Deprecated, ignored: use --token."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model's repository to run (off unless given)."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Also load pickle (.bin) model weights, which can run code; by default only safetensors."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local directory that datasets.load_dataset reads."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration, e.g. 3.0.0."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: json, jsonl, csv, parquet or txt."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same formats."})
    train_split: str | None = field(
        default=None, metadata={"help": "Split of --dataset_name to train on (default: train, or train_sft)."}
    )
    validation_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (default: validation, or test / test_sft)."}
    )
    max_seq_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt plus response."})
    validation_split_percentage: int = field(
        default=0, metadata={"help": "Percent of the training data held out for validation when none is given."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize instead of using the cache."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every batch to --max_seq_length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    keep_in_memory: bool = field(default=False, metadata={"help": "Keep the dataset in memory (no cache files)."})
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the validation split shuffle."})
    dataset_cache_directory: str | None = field(
        default=None,
        metadata={"help": "Where each node's local rank 0 of a multi-process run leaves the prepared data for "
                  "the other ranks (removed once read; default: the datasets cache)."},
    )
    dataset_concatenation: bool = field(
        default=False,
        metadata={"help": "Pack several samples into each --max_seq_length row (samples never attend to each other)."},
    )
    special_tokens: list[str] | None = field(default=None, metadata={"help": "Extra special tokens to add."})
    max_source_length: int = field(default=384, metadata={"help": "Prompt budget (chat, summarization, seq2seq)."})
    max_target_length: int = field(default=128, metadata={"help": "Target budget; new tokens for ROUGE generation."})
    num_beams: int = field(default=4, metadata={"help": "Beams for generation during evaluation."})
    streaming: bool = field(default=False, metadata={"help": "Stream a hub dataset instead of downloading it."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (reported) instead of stopping at the first."}
    )


@dataclass
class FinetuneArguments:
    peft: PeftMethod = field(default="lora", metadata={"help": "Adapter method."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: the model family's attention projections)."}
    )
    lora_all_linear: bool = field(default=False, metadata={"help": "Adapt every linear layer but the output head."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scaling alpha / sqrt(r)."})
    adapter_layers: int = field(default=30, metadata={"help": "LLaMA-Adapter: layers with adaption prompts."})
    adapter_len: int = field(default=10, metadata={"help": "LLaMA-Adapter: adaption prompt length."})
    num_virtual_tokens: int = field(default=10, metadata={"help": "P-tuning, prefix and prompt tuning: virtual tokens."})
    ptun_hidden_size: int = field(default=1024, metadata={"help": "P-tuning prompt encoder hidden size."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also supervise the prompt tokens."})
    device: Device = field(default="auto", metadata={"help": "Device: auto picks cuda, then xpu, then cpu."})
    task: Task = field(default="completion", metadata={"help": "What the data teaches and how it is evaluated."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat format: neural-chat (default), tokenizer, or a Jinja file path."}
    )
    eval_ppl: bool = field(default=True, metadata={"help": "Report eval_ppl = exp(eval_loss)."})
    do_lm_eval: bool = field(
        default=False,
        metadata={"help": "After training, run the task's benchmark: HumanEval for --task code-generation, "
                  "--lm_eval_tasks otherwise."},
    )
    lm_eval_tasks: list[str] = field(
        default_factory=lambda: ["truthfulqa_mc"],
        metadata={"help": "Benchmarks for --do_lm_eval: truthfulqa_mc (= mc1 + mc2), truthfulqa_mc1, "
                  "truthfulqa_mc2 built in; any other lm-evaluation-harness task name or task YAML file "
                  "runs through the lm_eval package (pip install lm_eval)."},
    )
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "Score only the first N questions of each --lm_eval_tasks benchmark."}
    )
    truthfulqa_file: str | None = field(
        default=None,
        metadata={"help": "TruthfulQA mc_task.json or TruthfulQA.csv (default: the hub data set "
                  "truthfulqa/truthful_qa)."},
    )
    humaneval_file: str | None = field(
        default=None, metadata={"help": "HumanEval problems for --task code-generation: HumanEval.jsonl(.gz)."}
    )
    humaneval_limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N HumanEval problems (default: all 164)."}
    )
    humaneval_n_samples: int = field(
        default=1, metadata={"help": "Completions per HumanEval problem: 1 is greedy; more sample and report "
                             "pass@k for every k in 1, 10, 100 up to N."}
    )
    humaneval_temperature: float = field(
        default=0.2, metadata={"help": "HumanEval sampling temperature (with --humaneval_n_samples > 1)."}
    )
    humaneval_top_p: float = field(
        default=0.95, metadata={"help": "HumanEval nucleus sampling mass (with --humaneval_n_samples > 1)."}
    )
    humaneval_max_new_tokens: int = field(
        default=512, metadata={"help": "Most tokens generated per HumanEval completion."}
    )
    eval_generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per generate/scoring call in task evaluations (ROUGE, HumanEval, "
                  "TruthfulQA); default --per_device_eval_batch_size."},
    )
    qlora: bool = field(default=False, metadata={"help": "Quantized base model plus LoRA."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the quantization constants."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "QLoRA 4-bit data type."})
    bits: int = field(default=4, metadata={"help": "QLoRA bits: 4 or 8."})
    full_finetune: bool = field(default=False, metadata={"help": "Train every weight, no adapter."})
    dry_run: bool = field(
        default=False,
        metadata={"help": "Prepare the data exactly as training would, print a report (tokens, truncation, "
                  "supervised share, packing, one decoded sample, optimizer steps) and stop: no weights load, "
                  "nothing trains, --output_dir is not touched."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start fresh in a non-empty --output_dir instead of refusing or resuming."}
    )
    use_habana: bool = field(default=False, metadata={"help": "Gaudi: run on HPU (needs Habana's software)."})
    use_lazy_mode: bool = field(default=False, metadata={"help": "Gaudi: lazy execution mode."})
    use_oneccl: bool = field(
        default=False,
        metadata={"help": "Use Intel oneCCL for CPU data parallelism (what --ddp_backend ccl asks for)."},
    )


@dataclass
class ParsedArgs:
    model: ModelArguments
    data: DataArguments
    finetune: FinetuneArguments
    training: TrainingArguments


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


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to ``flag`` (last one wins, as in argparse), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _accelerator_present() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _resolve_cpu_flag(argv: list[str]) -> list[str]:
    """Add ``--use_cpu`` when the run will be on the CPU, before TrainingArguments checks bf16.

    The reference rebuilt its TrainingArguments with ``no_cuda=True`` whenever the device
    resolved to cpu; TrainingArguments now rejects ``--bf16`` without a GPU unless told
    ``use_cpu``. A Gaudi run (``--device hpu``) also parses here, so that the run can stop
    with Habana's own message instead of a bf16 error.
    """
    if _flag_value(argv, "--use_cpu") is not None or "--use_cpu" in argv:
        return argv
    device = (_flag_value(argv, "--device") or "auto").strip("\"'").lower()
    if device == "cpu" or (device in ("auto", "hpu") and not _accelerator_present()):
        return argv + ["--use_cpu", "True"]
    return argv


def _rewrite_legacy_flags(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, _, inline = arg.partition("=")
        if flag == "--ddp_backend":
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            if value.lower() == "ccl":
                logger.warning("--ddp_backend ccl: transformers no longer lists oneCCL; lmtune sets it up itself.")
                out += ["--use_oneccl", "True"]
                i += 1 if inline else 2
                continue
        if flag not in LEGACY_FLAGS:
            out.append(arg)
            i += 1
            continue
        new_flag, why = LEGACY_FLAGS[flag]
        logger.warning("%s is a legacy spelling (%s); using %s.", flag, why, new_flag)
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


def _expand_config(argv: list[str]) -> list[str]:
    """Put ``--config FILE`` settings first so that flags on the command line override them."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        return _load_config_file(argv[0])  # the reference's `finetune_clm.py args.json` form
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a file path: --config recipe.yaml")
    return _load_config_file(argv[i + 1]) + argv[:i] + argv[i + 2 :]


def build_parser(seq2seq: bool = False) -> HfArgumentParser:
    training_cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    return HfArgumentParser(
        (ModelArguments, DataArguments, FinetuneArguments, training_cls), allow_abbrev=False
    )


def _known_flags(parser: HfArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _raise_unknown(parser: HfArgumentParser, remaining: list[str]) -> None:
    flags = [a.split("=")[0] for a in remaining if a.startswith("--")]
    if not flags:
        raise ConfigError(f"unexpected arguments {remaining}: every value must follow a --flag.")
    known = _known_flags(parser)
    problems = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown flag {flag}{hint}")
    raise ConfigError("; ".join(problems) + ". Run with --help for every flag.")


def parse_command_flags(dataclass_type: type, argv: list[str], prog: str) -> Any:
    """Parse the flags of one subcommand (``lmtune chat``, ``eval``, ``merge``) into its dataclass.

    Raises:
        ConfigError: for unknown flags (with a did-you-mean) or bad values.
    """
    parser = HfArgumentParser(dataclass_type, prog=prog, allow_abbrev=False)
    try:
        parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except SystemExit as exc:  # argparse exits on bad values; a library must raise instead
        raise ConfigError(f"invalid arguments {' '.join(argv)} (see the message above).") from exc
    if remaining:
        _raise_unknown(parser, remaining)
    return parsed


def parse_args(argv: list[str] | None = None, *, seq2seq: bool = False) -> ParsedArgs:
    """Parse flags (and ``--config FILE``) the way the reference's scripts do.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
        seq2seq: Parse ``Seq2SeqTrainingArguments`` instead of ``TrainingArguments``.

    Returns:
        The four argument objects.

    Raises:
        ConfigError: on unknown flags (with a did-you-mean), bad values or an unreadable config file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _resolve_cpu_flag(_rewrite_legacy_flags(_expand_config(argv)))
    parser = build_parser(seq2seq)
    try:
        model, data, finetune, training, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except SystemExit as exc:  # argparse exits on bad values; a library must raise instead
        raise ConfigError(f"invalid arguments {' '.join(argv)} (see the message above).") from exc
    except ValueError as exc:  # TrainingArguments.__post_init__ checks
        raise ConfigError(str(exc)) from exc
    except ImportError as exc:  # e.g. --deepspeed without the deepspeed package
        raise ConfigError(f"{exc}. Install the missing package (for --deepspeed: pip install deepspeed).") from exc
    if remaining:
        _raise_unknown(parser, remaining)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        training.output_dir = None  # transformers would invent "trainer_output"; the reference requires it
    if model.use_auth_token:
        logger.warning("--use_auth_token is deprecated and ignored; pass --token instead.")
    return ParsedArgs(model, data, finetune, training)


@dataclass(frozen=True)
class ProcessFlags:
    """The flags a process acts on before ``TrainingArguments`` exists (``train.distributed.setup_process``)."""

    device: str = "auto"
    use_habana: bool = False
    use_lazy_mode: bool = False
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    deepspeed: str | None = None


def parse_process_flags(argv: list[str]) -> ProcessFlags:
    """Read ``--device``, the Habana flags, ``--ddp_backend``, ``--ddp_timeout`` and ``--deepspeed`` alone.

    Building ``TrainingArguments`` starts accelerate (under a launcher, its process group),
    so a process must check its device, map its launcher's environment and start a ``ccl``
    group before :func:`parse_args`; these flags say how. Every other flag, and every
    unknown one, is left for :func:`parse_args` to check and report.

    Raises:
        ConfigError: an unreadable config file.
    """
    argv = _expand_config(list(argv))
    parser = HfArgumentParser(FinetuneArguments, allow_abbrev=False, exit_on_error=False)
    try:
        (finetune, _) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except argparse.ArgumentError:  # a bad value: parse_args reports it, with the full usage
        return ProcessFlags()
    backend = "ccl" if finetune.use_oneccl else _flag_value(argv, "--ddp_backend")
    timeout = _flag_value(argv, "--ddp_timeout") or ""
    return ProcessFlags(
        device=finetune.device, use_habana=finetune.use_habana, use_lazy_mode=finetune.use_lazy_mode,
        ddp_backend=backend, ddp_timeout=int(timeout) if timeout.isdigit() else 1800,
        deepspeed=_flag_value(argv, "--deepspeed"),
    )


def args_to_dict(args: ParsedArgs) -> dict[str, dict[str, Any]]:
    """The resolved arguments as JSON-ready dicts, one per group (hub token removed)."""
    out: dict[str, dict[str, Any]] = {}
    for group, obj in (("model", args.model), ("data", args.data), ("finetune", args.finetune)):
        out[group] = {f.name: getattr(obj, f.name) for f in fields(obj)}
    out["model"]["token"] = None
    out["training"] = {k: v for k, v in args.training.to_dict().items() if "token" not in k}
    return out


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def _run_safety_problems(data: DataArguments, ft: FinetuneArguments, training: TrainingArguments) -> list[str]:
    """Inputs that are not what they claim to be, and output/resume flags that contradict each other."""
    problems = []
    for flag in ("train_file", "validation_file"):
        path = getattr(data, flag)
        if path and Path(path).is_dir():
            problems.append(f"--{flag} {path} is a directory; name a data file, or pass the directory as "
                            "--dataset_name DIR")
    if training.do_eval and not (data.validation_file or data.dataset_name or data.validation_split_percentage):
        problems.append("--do_eval needs validation data: add --validation_file FILE or "
                        "--validation_split_percentage N (N% of the training records are held out)")
    output = Path(training.output_dir) if training.output_dir else None
    if output is not None and output.is_file():
        problems.append(f"--output_dir {training.output_dir} is a file; give a directory")
    resume = training.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "latest", "last"):
        if not Path(resume).is_dir():
            problems.append(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
        elif ft.overwrite_output_dir and output is not None and output.resolve() in Path(resume).resolve().parents:
            problems.append(f"--overwrite_output_dir would delete {resume}, the checkpoint --resume_from_checkpoint "
                            "names; drop one of the two flags")
    elif resume and ft.overwrite_output_dir:
        problems.append(f"--resume_from_checkpoint {resume} resumes from a checkpoint in --output_dir, which "
                        "--overwrite_output_dir clears; drop one of the two flags")
    return problems


def _evaluation_problems(ft: FinetuneArguments) -> list[str]:
    """Post-training evaluation settings that cannot work."""
    problems = []
    for flag in ("lm_eval_limit", "humaneval_limit", "eval_generation_batch_size"):
        value = getattr(ft, flag)
        if value is not None and value <= 0:
            problems.append(f"--{flag} must be > 0 (got {value})")
    for flag in ("humaneval_n_samples", "humaneval_max_new_tokens"):
        if getattr(ft, flag) <= 0:
            problems.append(f"--{flag} must be > 0 (got {getattr(ft, flag)})")
    if ft.humaneval_temperature <= 0:
        problems.append(f"--humaneval_temperature must be > 0 (got {ft.humaneval_temperature})")
    if not 0 < ft.humaneval_top_p <= 1:
        problems.append(f"--humaneval_top_p must be in (0, 1] (got {ft.humaneval_top_p})")
    for flag in ("truthfulqa_file", "humaneval_file"):
        path = getattr(ft, flag)
        if path and not Path(path).exists():
            problems.append(f"--{flag} {path}: no such file")
    if ft.do_lm_eval and ft.task == "code-generation" and not ft.humaneval_file:
        problems.append("--do_lm_eval with --task code-generation runs HumanEval and needs --humaneval_file "
                        "HumanEval.jsonl.gz (the public file of openai/human-eval; this build does not fetch it)")
    return problems


def validate_args(args: ParsedArgs) -> None:
    """Check every cross-field rule at once, before anything loads.

    Raises:
        ConfigError: listing every problem found, each with its fix.
    """
    model, data, ft, training = args.model, args.data, args.finetune, args.training
    problems: list[str] = []
    if not model.model_name_or_path:
        problems.append("--model_name_or_path is required: a local model directory or a hub id")
    if not training.output_dir:
        problems.append("--output_dir is required: where the adapter, checkpoints and results go")
    if not (data.dataset_name or data.train_file or data.validation_file):
        problems.append("no data: give --train_file FILE or --dataset_name NAME_OR_DIR")
    if data.dataset_name and data.train_file:
        problems.append("give --train_file or --dataset_name, not both")
    for flag in ("train_file", "validation_file"):
        path = getattr(data, flag)
        if path and not path.endswith(DATA_SUFFIXES) and not Path(path).is_dir():
            problems.append(f"--{flag} {path}: unsupported file type; allowed: {', '.join(DATA_SUFFIXES)}")
    if data.streaming and not data.dataset_name:
        problems.append("--streaming reads a --dataset_name split as a stream; local files are read whole")
    if data.streaming and data.validation_split_percentage:
        problems.append("--validation_split_percentage cannot hold out a share of a stream; "
                        "name a validation split with --validation_split")
    if training.do_train and not (data.dataset_name or data.train_file):
        problems.append("--do_train needs training data: --train_file or --dataset_name")
    if not 0 <= data.validation_split_percentage < 100:
        problems.append(f"--validation_split_percentage must be in 0..99 (got {data.validation_split_percentage})")
    for flag in ("max_seq_length", "max_source_length", "max_target_length", "num_beams"):
        if getattr(data, flag) <= 0:
            problems.append(f"--{flag} must be > 0 (got {getattr(data, flag)})")
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(data, flag)
        if value is not None and value <= 0:
            problems.append(f"--{flag} must be > 0 (got {value})")
    if ft.lora_rank <= 0:
        problems.append(f"--lora_rank must be > 0 (got {ft.lora_rank})")
    if ft.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be > 0 (got {ft.lora_alpha})")
    if not 0 <= ft.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1) (got {ft.lora_dropout})")
    if ft.lora_target_modules and ft.lora_all_linear:
        problems.append("--lora_target_modules and --lora_all_linear exclude each other: give one")
    for flag in ("num_virtual_tokens", "adapter_len", "adapter_layers", "ptun_hidden_size"):
        if getattr(ft, flag) <= 0:
            problems.append(f"--{flag} must be > 0 (got {getattr(ft, flag)})")
    if ft.qlora and ft.full_finetune:
        problems.append("--qlora and --full_finetune exclude each other: QLoRA trains a LoRA adapter")
    if ft.qlora and ft.bits not in (4, 8):
        problems.append(f"--bits must be 4 or 8 with --qlora (got {ft.bits})")
    if ft.qlora and ft.peft != "lora":
        problems.append(f"--qlora trains LoRA adapters; --peft {ft.peft} cannot be quantized-trained")
    if training.bf16 and training.fp16:
        problems.append("--bf16 and --fp16 exclude each other")
    problems += _run_safety_problems(data, ft, training)
    problems += _evaluation_problems(ft)
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
