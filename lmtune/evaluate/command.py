"""``lmtune eval``: the post-training evaluations, on a saved model (+ adapter), without training.

Example::

    lmtune eval --model_name_or_path ./base --adapter ./out --task summarization \\
        --validation_file news.jsonl --max_eval_samples 100 --output_dir ./eval
    lmtune eval --task humaneval --humaneval_file HumanEval.jsonl.gz --reference_solutions --output_dir ./eval
    lmtune eval --model_name_or_path ./base --adapter ./out --task mbpp --mbpp_file mbpp.jsonl --output_dir ./eval

Contract: flags parse into ``EvalArguments`` (``HfArgumentParser``, unknown flags raise);
``run_eval`` loads the model, runs one evaluation from ``lmtune.evaluate.tasks`` (or the
perplexity loop here) and writes ``eval_results.json`` (plus generations or per-problem
results) in ``--output_dir``. ``--max_eval_samples`` caps records, problems or questions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase

from lmtune.progress_lines import tracked
from lmtune.data.collate import CausalLMCollator
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.sources import load_splits
from lmtune.command_flags import parse_command_flags
from lmtune.errors import ConfigError
from lmtune.evaluate.perplexity import perplexity_from_loss
from lmtune.evaluate.tasks import (
    evaluate_benchmarks,
    evaluate_code_generation,
    evaluate_summarization,
    score_reference_solutions,
)
from lmtune.model.base_model import absolute_model_path, recorded_base_model
from lmtune.model.context import fit_to_context
from lmtune.model.inference import load_for_use
from lmtune.model.load import is_seq2seq

logger = logging.getLogger(__name__)

EvalTask = Literal["summarization", "code-generation", "humaneval", "mbpp", "truthfulqa", "lm-eval", "perplexity"]
RESULTS_FILE = "eval_results.json"


@dataclass
class EvalArguments:
    task: EvalTask | None = field(
        default=None,
        metadata={"help": "What to measure: summarization (ROUGE), code-generation / humaneval / mbpp (pass@k), "
                  "truthfulqa or lm-eval (--lm_eval_tasks), perplexity (eval loss on --validation_file)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where eval_results.json is written (required)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model directory or hub id (default: the one --adapter was trained on)."}
    )
    adapter: str | None = field(default=None, metadata={"help": "Adapter directory (PEFT format) loaded on top."})
    validation_file: str | None = field(default=None, metadata={"help": "Records to evaluate on (json, jsonl, ...)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset directory or hub id instead."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration, e.g. 3.0.0."})
    validation_split: str | None = field(default=None, metadata={"help": "Split of --dataset_name to use."})
    data_task: Literal["completion", "chat", "summarization", "code-generation"] = field(
        default="completion", metadata={"help": "Perplexity: how the records are rendered (the --task of training)."}
    )
    chat_template: str | None = field(default=None, metadata={"help": "Perplexity on chat data: the chat format."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N records, HumanEval problems or questions."}
    )
    max_seq_length: int = field(default=512, metadata={"help": "Perplexity: most tokens per sample."})
    max_source_length: int = field(default=384, metadata={"help": "Prompt budget, as in training."})
    max_target_length: int = field(default=128, metadata={"help": "Target budget; new tokens per summary."})
    num_beams: int = field(default=4, metadata={"help": "Beams for summary generation (1 = greedy)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts or samples per forward/generate call."})
    humaneval_file: str | None = field(default=None, metadata={"help": "HumanEval.jsonl(.gz)."})
    mbpp_file: str | None = field(
        default=None, metadata={"help": "--task mbpp: mbpp.jsonl or sanitized-mbpp.json (its test split, ids 11-510)."}
    )
    reference_solutions: bool = field(
        default=False, metadata={"help": "Score HumanEval's canonical solutions (checks the harness; no model)."}
    )
    humaneval_n_samples: int = field(default=1, metadata={"help": "Completions per problem (1 = greedy)."})
    humaneval_temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (n > 1)."})
    humaneval_top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (n > 1)."})
    humaneval_max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per completion."})
    truthfulqa_file: str | None = field(
        default=None, metadata={"help": "TruthfulQA mc_task.json or TruthfulQA.csv (default: the hub data set)."}
    )
    lm_eval_tasks: list[str] = field(
        default_factory=lambda: ["truthfulqa_mc"],
        metadata={"help": "Benchmarks: truthfulqa_mc, truthfulqa_mc1, truthfulqa_mc2, or lm_eval task names/YAMLs."},
    )
    device: Literal["auto", "cpu", "cuda", "xpu"] = field(default="auto", metadata={"help": "Where the model runs."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Weights dtype."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from its repository."})
    skip_invalid_records: bool = field(default=False, metadata={"help": "Skip malformed records (reported)."})

    def __post_init__(self) -> None:
        for name in ("max_eval_samples",):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be > 0 (got {value})")
        for name in ("max_seq_length", "max_source_length", "max_target_length", "num_beams", "batch_size",
                     "humaneval_n_samples", "humaneval_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0 (got {getattr(self, name)})")


def parse_eval_args(argv: list[str]) -> EvalArguments:
    """Parse ``lmtune eval`` flags and check that they fit together.

    Raises:
        ConfigError: for unknown flags (with a did-you-mean), bad values, or a missing required flag.
    """
    args = parse_command_flags(EvalArguments, argv, "lmtune eval")
    if not args.model_name_or_path and args.adapter:
        args.model_name_or_path = recorded_base_model(args.adapter)
    problems = _problems(args)
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
    return args


def _problems(args: EvalArguments) -> list[str]:
    problems = []
    if args.task is None:
        problems.append("--task is required: summarization, code-generation, humaneval, truthfulqa, lm-eval or "
                        "perplexity")
    if not args.output_dir:
        problems.append("--output_dir is required: where eval_results.json is written")
    humaneval = args.task in ("code-generation", "humaneval")
    if args.reference_solutions and not (humaneval or args.task == "mbpp"):
        problems.append("--reference_solutions applies to --task humaneval or mbpp")
    if not args.model_name_or_path and not ((humaneval or args.task == "mbpp") and args.reference_solutions):
        problems.append("--model_name_or_path is required unless --adapter records its base model (only --task "
                        "humaneval or mbpp --reference_solutions runs without a model)")
    if humaneval and not args.humaneval_file:
        problems.append("--task humaneval needs --humaneval_file HumanEval.jsonl.gz")
    if args.task == "mbpp" and not args.mbpp_file:
        problems.append("--task mbpp needs --mbpp_file mbpp.jsonl (or sanitized-mbpp.json)")
    if args.task in ("summarization", "perplexity") and not (args.validation_file or args.dataset_name):
        problems.append(f"--task {args.task} needs records: --validation_file FILE or --dataset_name DIR")
    for flag in ("humaneval_file", "mbpp_file", "truthfulqa_file", "validation_file", "adapter"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            problems.append(f"--{flag} {path}: no such file or directory")
    return problems


def load_eval_model(args: EvalArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model, the adapter on top (its saved tokenizer preferred), in eval mode.

    Raises:
        ConfigError: when the model, tokenizer or adapter cannot be loaded.
    """
    return load_for_use(args.model_name_or_path, args.adapter, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)


def _records(args: EvalArguments) -> list[dict]:
    splits = load_splits(validation_file=args.validation_file, dataset_name=args.dataset_name,
                         dataset_config_name=args.dataset_config_name, validation_split=args.validation_split,
                         skip_invalid=args.skip_invalid_records)
    if "validation" not in splits:
        raise ConfigError(f"--dataset_name {args.dataset_name}: no validation split; name one with --validation_split.")
    records = splits["validation"]
    limit = min(args.max_eval_samples or len(records), len(records))
    return list(records.select(range(limit)))


@torch.inference_mode()
def dataset_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples, *,
                       batch_size: int = 8) -> dict[str, float]:
    """Token-level loss and perplexity over every supervised token of rendered samples.

    Unlike the Trainer's ``eval_loss`` (a mean of per-batch means), every supervised token
    weighs the same, so the number does not depend on the batch size.
    """
    seq2seq = is_seq2seq(model.config)
    collate = (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX) if seq2seq
               else CausalLMCollator(tokenizer.pad_token_id))
    total, tokens = 0.0, 0
    for start in tracked(range(0, len(samples), batch_size), -(-len(samples) // batch_size), "perplexity"):
        rows = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        batch = {k: v.to(model.device) for k, v in collate([dict(r) for r in rows]).items()}
        # Causal LMs predict token t+1 from position t: the first label never counts.
        counted = batch["labels"] if seq2seq else batch["labels"][:, 1:]
        count = int((counted != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * count
        tokens += count
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": perplexity_from_loss(loss), "eval_samples": len(samples),
            "eval_tokens": tokens}


def _perplexity(args: EvalArguments, model, tokenizer) -> dict[str, float]:
    max_seq_length = fit_to_context(args.max_seq_length, model.config, "--max_seq_length")
    settings = RenderSettings(max_seq_length=max_seq_length, max_source_length=args.max_source_length,
                              max_target_length=args.max_target_length, chat_template=args.chat_template,
                              skip_invalid_records=args.skip_invalid_records)
    data = prepare_data(tokenizer, task=args.data_task, validation_file=args.validation_file,
                        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                        validation_split=args.validation_split, max_eval_samples=args.max_eval_samples,
                        seq2seq=is_seq2seq(model.config), need_train=False, need_validation=True, settings=settings)
    return dataset_perplexity(model, tokenizer, data.validation, batch_size=args.batch_size)


def _measure(args: EvalArguments, output_dir: Path) -> dict[str, Any]:
    if args.task in ("code-generation", "humaneval") and args.reference_solutions:
        return score_reference_solutions(args.humaneval_file, limit=args.max_eval_samples, output_dir=output_dir)
    if args.task == "mbpp" and args.reference_solutions:
        return score_reference_solutions(args.mbpp_file, limit=args.max_eval_samples, output_dir=output_dir,
                                         benchmark="mbpp")
    model, tokenizer = load_eval_model(args)
    if args.task == "summarization":
        return evaluate_summarization(
            model, tokenizer, _records(args), max_source_length=args.max_source_length,
            max_target_length=args.max_target_length, num_beams=args.num_beams, batch_size=args.batch_size,
            output_dir=output_dir, skip_invalid=args.skip_invalid_records,
        )
    if args.task in ("code-generation", "humaneval", "mbpp"):
        mbpp = args.task == "mbpp"
        return evaluate_code_generation(
            model, tokenizer, humaneval_file=args.mbpp_file if mbpp else args.humaneval_file,
            benchmark="mbpp" if mbpp else "humaneval", limit=args.max_eval_samples,
            n_samples=args.humaneval_n_samples, temperature=args.humaneval_temperature, top_p=args.humaneval_top_p,
            max_new_tokens=args.humaneval_max_new_tokens, batch_size=args.batch_size, output_dir=output_dir,
        )
    if args.task == "perplexity":
        return _perplexity(args, model, tokenizer)
    return evaluate_benchmarks(model, tokenizer, args.lm_eval_tasks, truthfulqa_file=args.truthfulqa_file,
                               limit=args.max_eval_samples, batch_size=args.batch_size)


def evaluated_inputs(args: EvalArguments) -> dict[str, Any]:
    """What the numbers are of: the model, the adapter and the data, recorded beside them."""
    data = {"validation_file": args.validation_file, "dataset_name": args.dataset_name,
            "dataset_config_name": args.dataset_config_name, "validation_split": args.validation_split,
            "humaneval_file": args.humaneval_file, "mbpp_file": args.mbpp_file, "truthfulqa_file": args.truthfulqa_file,
            "lm_eval_tasks": args.lm_eval_tasks if args.task in ("truthfulqa", "lm-eval") else None}
    return {
        "task": args.task, "model": absolute_model_path(args.model_name_or_path),
        "adapter": absolute_model_path(args.adapter), "max_eval_samples": args.max_eval_samples,
        "data": {key: absolute_model_path(value) if isinstance(value, str) else value
                 for key, value in data.items() if value is not None},
    }


def run_eval(args: EvalArguments) -> dict[str, Any]:
    """Run the evaluation ``args.task`` names and write ``eval_results.json`` in ``args.output_dir``.

    Returns:
        The metrics written.

    Raises:
        LmtuneError: for anything a user can fix (flags, files, models, missing packages).
    """
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = _measure(args, output_dir)
    record = {**metrics, "evaluated": evaluated_inputs(args)}
    (output_dir / RESULTS_FILE).write_text(json.dumps(record, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    for key, value in metrics.items():
        print(f"  {key:<28} = {value:.4f}" if isinstance(value, float) else f"  {key:<28} = {value}")
    print(f"lmtune eval: results in {output_dir / RESULTS_FILE}")
    return metrics
