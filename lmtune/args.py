"""Command-line and config-file arguments: the reference's flags, parsed the Hugging Face way.

Three dataclasses of our own (model, data, fine-tuning) plus the unmodified
``transformers.TrainingArguments`` (``Seq2SeqTrainingArguments`` for seq2seq),
parsed by ``HfArgumentParser``, once: ``parse_flags`` turns the command line into plain
values (before any argument object, and so accelerate, exists), the process setup and the
model-kind decision read those, and ``build_args`` makes the typed objects. Flags that
transformers has renamed since the reference was written are rewritten first (``argv.py``);
every cross-field check lives in ``validation.py`` and runs before anything loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import HfArgumentParser, PretrainedConfig, Seq2SeqTrainingArguments, TrainingArguments

from lmtune.argv import expand_config, rewrite_legacy_flags, runs_on_cpu
from lmtune.command_flags import DefaultsOnceFormatter, checked_parse
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
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reading earlier results from the datasets cache."}
    )
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every batch to --max_seq_length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    keep_in_memory: bool = field(
        default=False, metadata={"help": "Tokenize in memory: neither read nor write datasets cache files."}
    )
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the validation split shuffle."})
    dataset_cache_directory: str | None = field(
        default=None,
        metadata={"help": "Where tokenized data is cached, for later runs and for the other ranks of a node "
                  "(default: the datasets cache, HF_DATASETS_CACHE)."},
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
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (datasets.map num_proc)."}
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (reported) instead of stopping at the first."}
    )
    strict_records: bool = field(
        default=False,
        metadata={"help": "Refuse data holding records with an empty response, instruction or turn, naming each; "
                  "by default they are left out, counted and the first few named in one warning."},
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
    mbpp_file: str | None = field(
        default=None,
        metadata={"help": "MBPP problems for --task code-generation (mbpp.jsonl or sanitized-mbpp.json): "
                  "mbpp_pass@1 at every evaluation, and after training with --do_lm_eval."},
    )
    eval_metric_samples: int | None = field(
        default=None,
        metadata={"help": "Items (summaries, problems, questions) the task metric scores at each evaluation "
                  "during training; 0: eval_loss only. Default: as many as keep one evaluation's metric "
                  "under a fifth of the training time between evaluations (printed at the first one)."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop when --metric_for_best_model has not improved for N evaluations."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Least change of --metric_for_best_model that counts as an improvement."}
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
    # The model's config, when parsing read it to tell a causal from a seq2seq model (run_finetune reuses it).
    model_config: PretrainedConfig | None = None


# Seq2SeqTrainingArguments' own fields: parsed for every model, accepted only for seq2seq ones.
SEQ2SEQ_ONLY = frozenset(f.name for f in fields(Seq2SeqTrainingArguments)) - {f.name for f in fields(TrainingArguments)}
_UNSET = object()  # a flag's value before argparse has seen it: tells "given" from "defaulted"
_WATCHED = SEQ2SEQ_ONLY | {"use_cpu", "greater_is_better", "lora_all_linear"}


def build_parser(
    prog: str = "lmtune finetune", *, extra: tuple[type, ...] = (), defaults: dict[str, Any] | None = None,
    seq2seq: bool = True,
) -> HfArgumentParser:
    """The one parser of a training command: our three dataclasses, the command's ``extra`` ones, the
    training arguments and ``--config``.

    For ``lmtune finetune`` the training arguments are ``Seq2SeqTrainingArguments``: the seq2seq fields
    are parsed for every model and accepted for seq2seq models only (``build_args``), so that one parse
    serves both model kinds and ``--help`` lists every flag.

    Args:
        prog: The command's name in ``--help``.
        extra: The command's own dataclasses (``lmtune dpo``: ``PreferenceArguments``).
        defaults: The command's defaults where they differ from the dataclasses' (``dpo_clm.py``'s).
        seq2seq: Parse the seq2seq fields too; without, plain ``TrainingArguments`` (causal models only).
    """
    training = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, FinetuneArguments, *extra, training), prog=prog,
        allow_abbrev=False, formatter_class=DefaultsOnceFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of flag: value settings (also the "
                        "reference's `finetune_clm.py args.json` form); flags on the command line override it.")
    if defaults:
        parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in SEQ2SEQ_ONLY:
            action.help = f"{action.help or ''} (seq2seq models only)".strip()
    return parser


@dataclass(frozen=True)
class ParsedFlags:
    """The command line parsed once, before any argument object (or accelerate) exists.

    Attributes:
        values: Every flag's value (``dest`` -> value), defaults included.
        given: The seq2seq-only flags, ``use_cpu``, ``greater_is_better`` and ``lora_all_linear``, when
            given explicitly.
    """

    values: dict[str, Any]
    given: frozenset[str]


def parse_flags(
    argv: list[str] | None = None, *, notices: list[str] | None = None, parser: HfArgumentParser | None = None,
) -> ParsedFlags:
    """Parse a training command's flags (and ``--config FILE``) once, into plain values.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
        notices: Collects the legacy-spelling notices instead of logging them (a launcher's other
            ranks should not repeat them).
        parser: The command's ``build_parser(...)``; ``lmtune finetune``'s when None.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: on unknown flags (with a did-you-mean), bad values or an unreadable config file.
    """
    argv = rewrite_legacy_flags(expand_config(list(sys.argv[1:] if argv is None else argv)), notices=notices)
    parser = parser or build_parser()
    watched = _WATCHED & {action.dest for action in parser._actions}
    namespace = argparse.Namespace(**dict.fromkeys(watched, _UNSET))
    values = vars(checked_parse(parser, argv, namespace))
    given = frozenset(name for name in watched if values[name] is not _UNSET)
    for name in watched - given:
        values[name] = parser.get_default(name)
    return ParsedFlags(values, given)


def _build(cls: type, values: dict[str, Any], **overrides: Any) -> Any:
    names = {f.name for f in fields(cls) if f.init}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})


def build_extra(flags: ParsedFlags, cls: type) -> Any:
    """One of a command's ``extra`` dataclasses (``build_parser``) from the parsed flags."""
    return _build(cls, flags.values)


def build_args(flags: ParsedFlags, *, seq2seq: bool) -> ParsedArgs:
    """The typed argument objects for a causal (``TrainingArguments``) or seq2seq model.

    Raises:
        ConfigError: seq2seq-only flags for a causal model, or what ``TrainingArguments`` rejects.
    """
    values = flags.values
    misplaced = sorted(flags.given & SEQ2SEQ_ONLY)
    if misplaced and not seq2seq:
        raise ConfigError(f"{', '.join('--' + name for name in misplaced)}: for seq2seq (encoder-decoder) models "
                          "only, and this model is a causal LM; drop it.")
    # The reference rebuilt its TrainingArguments with no_cuda=True whenever the device resolved to cpu;
    # TrainingArguments now rejects --bf16 without a GPU unless told use_cpu.
    use_cpu = values["use_cpu"] if "use_cpu" in flags.given else runs_on_cpu(values["device"])
    model, data, finetune = (_build(cls, values) for cls in (ModelArguments, DataArguments, FinetuneArguments))
    try:
        training = _build(Seq2SeqTrainingArguments if seq2seq else TrainingArguments, values, use_cpu=use_cpu)
    except ValueError as exc:  # TrainingArguments.__post_init__ checks
        raise ConfigError(str(exc)) from exc
    except ImportError as exc:  # e.g. --deepspeed without the deepspeed package
        raise ConfigError(f"{exc}. Install the missing package (for --deepspeed: pip install deepspeed).") from exc
    if values["output_dir"] is None:
        training.output_dir = None  # transformers would invent "trainer_output"; the reference requires it
    if model.use_auth_token:
        logger.warning("--use_auth_token is deprecated and ignored; pass --token instead.")
    if training.metric_for_best_model and "greater_is_better" not in flags.given:
        # transformers infers it from a "loss" suffix alone; a perplexity is better lower too.
        training.greater_is_better = not training.metric_for_best_model.endswith(("loss", "ppl"))
    return ParsedArgs(model, data, finetune, training)


def parse_args(argv: list[str] | None = None, *, seq2seq: bool = False) -> ParsedArgs:
    """Parse flags (and ``--config FILE``) the way the reference's scripts do, for one model kind.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
        seq2seq: Build ``Seq2SeqTrainingArguments`` instead of ``TrainingArguments``.

    Returns:
        The four argument objects.

    Raises:
        HelpShown: ``--help`` was given.
        ConfigError: on unknown flags (with a did-you-mean), bad values or an unreadable config file.
    """
    return build_args(parse_flags(argv), seq2seq=seq2seq)


@dataclass(frozen=True)
class ProcessFlags:
    """The flags a process acts on before ``TrainingArguments`` exists (``train.distributed.setup_process``)."""

    device: str = "auto"
    use_habana: bool = False
    use_lazy_mode: bool = False
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    deepspeed: str | None = None

    @classmethod
    def from_flags(cls, flags: ParsedFlags) -> ProcessFlags:
        """``--device``, the Habana flags, ``--ddp_backend`` (``ccl`` arrives as ``--use_oneccl``), its timeout
        and ``--deepspeed``: building ``TrainingArguments`` starts accelerate (under a launcher, its process
        group), so a process checks its device, maps its launcher's environment and starts a ``ccl`` group first."""
        v = flags.values
        return cls(device=v["device"], use_habana=v["use_habana"], use_lazy_mode=v["use_lazy_mode"],
                   ddp_backend="ccl" if v["use_oneccl"] else v["ddp_backend"], ddp_timeout=v["ddp_timeout"],
                   deepspeed=v["deepspeed"])


def args_to_dict(args: ParsedArgs) -> dict[str, dict[str, Any]]:
    """The resolved arguments as JSON-ready dicts, one per group (hub token removed)."""
    out: dict[str, dict[str, Any]] = {}
    for group, obj in (("model", args.model), ("data", args.data), ("finetune", args.finetune)):
        out[group] = {f.name: getattr(obj, f.name) for f in fields(obj)}
    out["model"]["token"] = None
    out["training"] = {k: v for k, v in args.training.to_dict().items() if "token" not in k}
    return out
