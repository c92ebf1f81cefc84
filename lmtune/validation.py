"""Cross-field checks of a parsed command line, all at once, before anything loads.

Each problem names the flag, what it got and the fix; ``validate_args`` raises them together
so that one failed start shows every mistake.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import TrainingArguments

from lmtune.args import DataArguments, FinetuneArguments, ParsedArgs
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.evaluate.tasks import TaskEvalSettings


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
    for flag in ("truthfulqa_file", "humaneval_file", "mbpp_file"):
        path = getattr(ft, flag)
        if path and not Path(path).exists():
            problems.append(f"--{flag} {path}: no such file")
    if ft.do_lm_eval and ft.task == "code-generation" and not (ft.humaneval_file or ft.mbpp_file):
        problems.append("--do_lm_eval with --task code-generation runs HumanEval and needs --humaneval_file "
                        "HumanEval.jsonl.gz (the public file of openai/human-eval; this build does not fetch it)")
    return problems


def task_eval_settings(args: ParsedArgs) -> TaskEvalSettings:
    """The evaluations the command line asks for, as the flat settings ``lmtune.evaluate`` takes."""
    data_args, ft, training = args.data, args.finetune, args.training
    return TaskEvalSettings(
        task=ft.task, do_eval=training.do_eval, do_lm_eval=ft.do_lm_eval, lm_eval_tasks=tuple(ft.lm_eval_tasks),
        lm_eval_limit=ft.lm_eval_limit, truthfulqa_file=ft.truthfulqa_file,
        max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length,
        num_beams=data_args.num_beams, batch_size=ft.eval_generation_batch_size or training.per_device_eval_batch_size,
        humaneval_file=ft.humaneval_file, mbpp_file=ft.mbpp_file, humaneval_limit=ft.humaneval_limit,
        humaneval_n_samples=ft.humaneval_n_samples, humaneval_temperature=ft.humaneval_temperature,
        humaneval_top_p=ft.humaneval_top_p, humaneval_max_new_tokens=ft.humaneval_max_new_tokens,
        skip_invalid_records=data_args.skip_invalid_records, cache_dir=args.model.cache_dir,
    )


def _best_model_problems(args: ParsedArgs) -> list[str]:
    """Early stopping and best-model flags that cannot work with what the run evaluates."""
    from lmtune.evaluate.in_training import metric_keys

    ft, training, problems = args.finetune, args.training, []
    if ft.eval_metric_samples is not None and ft.eval_metric_samples < 0:
        problems.append(f"--eval_metric_samples must be >= 0 (got {ft.eval_metric_samples}); 0 turns task metrics off")
    if ft.early_stopping_threshold < 0:
        problems.append(f"--early_stopping_threshold must be >= 0 (got {ft.early_stopping_threshold})")
    evaluates = training.eval_strategy != "no"
    if ft.early_stopping_patience is not None:
        if ft.early_stopping_patience <= 0:
            problems.append(f"--early_stopping_patience must be > 0 (got {ft.early_stopping_patience})")
        if not evaluates:
            problems.append("--early_stopping_patience needs evaluations during training: add --eval_strategy steps "
                            "(with --eval_steps N) or epoch")
        if not training.metric_for_best_model:
            problems.append("--early_stopping_patience needs --metric_for_best_model (e.g. eval_loss, eval_rouge1, "
                            "humaneval_pass@1)")
    name = training.metric_for_best_model
    if name:
        generates = getattr(training, "predict_with_generate", False)  # the Seq2SeqTrainer's own ROUGE
        task = metric_keys(task_eval_settings(args)) if evaluates and (ft.eval_metric_samples != 0 or generates) \
            else []
        known = ["eval_loss", *(["eval_ppl"] if ft.eval_ppl else []), *(f"eval_{key}" for key in task)]
        if (name if name.startswith("eval_") else f"eval_{name}") not in known and name != "loss":
            close = difflib.get_close_matches(f"eval_{name.removeprefix('eval_')}", known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"--metric_for_best_model {name}: this run does not compute it{hint}; it computes "
                            f"{', '.join(known)}. Task metrics need --eval_strategy steps|epoch and, for code "
                            "generation and TruthfulQA, --humaneval_file / --mbpp_file / --truthfulqa_file")
    return problems


def validate_args(args: ParsedArgs, checks: Sequence[Callable[[], None]] = ()) -> None:
    """Check every cross-field rule at once, before anything loads.

    Args:
        args: The parsed arguments.
        checks: Further checks that raise (the adapter method, quantization backend, evaluation
            and logging settings); their problems join this one error.

    Raises:
        ConfigError: listing every problem found, each with its fix.
        UnsupportedError: when the only problem is something this machine lacks.
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
    problems += _best_model_problems(args)
    missing: list[UnsupportedError] = []
    for check in checks:
        try:
            check()
        except UnsupportedError as err:
            missing.append(err)
        except ConfigError as err:
            problems.append(str(err).rstrip("."))
    if problems:
        problems += [str(err).rstrip(".") for err in missing]
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
    if missing:
        raise missing[0]
