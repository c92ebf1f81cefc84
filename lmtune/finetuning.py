"""One fine-tuning run, start to end: the function the CLI and the Python API both call.

``run_finetune`` reads top to bottom like the run itself: check arguments, prepare the
output directory, load the tokenizer, prepare the data (all bad input fails here, before
any weights load), load the model, attach the adapter, train, save, evaluate, report.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, Seq2SeqTrainingArguments, Trainer

from lmtune.args import ParsedArgs, args_to_dict, build_args
from lmtune.argv import config_to_argv
from lmtune.data.chat_format import names_template_file, resolve_chat_format
from lmtune.data.collate import CausalLMCollator
from lmtune.data.prepare import PreparedData, RenderSettings, prepare_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.report import build_data_report, estimate_steps, format_data_report
from lmtune.evaluate.after_training import evaluate_after_training, generated_rouge_metrics
from lmtune.evaluate.in_training import build_task_metrics
from lmtune.evaluate.tasks import ROUGE, check_task_evaluation
from lmtune.export.model_card import write_run_summary
from lmtune.model.load import (
    is_seq2seq,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from lmtune.model.base_model import absolute_model_path
from lmtune.model.context import fit_to_context
from lmtune.train.distributed import fsdp_notice
from lmtune.train.checkpointing import StopOnSignal, train_and_save
from lmtune.run_record import write_run_args
from lmtune.run_setup import (
    adapt_model,
    check_cpu_bf16,
    check_model_flags,
    configure_logging,
    transformers_log_level,
    parse_and_set_up,
    quant_settings,
    with_device,
)
from lmtune.train.output_dir import clear_earlier_run, prepare_output_dir
from lmtune.process_state import preserved_process_state
from lmtune.model.quantize import (
    quantization_config,
    quantized_device_map,
)
from lmtune.train.progress import check_report_to, install_progress
from lmtune.train.eval_metrics import evaluation_callbacks
from lmtune.train.startup import StartupPhases, StartupReport
from lmtune.train.trainer import build_trainer
from lmtune.train.whole_run import final_train_metrics
from lmtune.train.zero import whole_weights
from lmtune.validation import task_eval_settings, validate_args

logger = logging.getLogger(__name__)


def _record_absolute_paths(args: ParsedArgs) -> None:
    """A local base model is loaded, and so recorded (``lmtune_args.json``, peft's ``adapter_config.json``),
    by its absolute path: chat, eval and merge then find it from any directory."""
    model = args.model
    for name in ("model_name_or_path", "tokenizer_name", "config_name"):
        setattr(model, name, absolute_model_path(getattr(model, name)))


def _prepare(args: ParsedArgs, tokenizer, *, seq2seq: bool) -> PreparedData:
    data, ft, training = args.data, args.finetune, args.training
    settings = RenderSettings(
        max_seq_length=data.max_seq_length, max_source_length=data.max_source_length,
        max_target_length=data.max_target_length, train_on_inputs=ft.train_on_inputs,
        skip_invalid_records=data.skip_invalid_records, chat_template=ft.chat_template,
        strict_records=data.strict_records,
    )
    inputs = dict(
        task=ft.task, train_file=data.train_file, validation_file=data.validation_file,
        dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name,
        train_split=data.train_split, validation_split=data.validation_split,
        validation_split_percentage=data.validation_split_percentage,
        max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
        dataset_concatenation=data.dataset_concatenation, seq2seq=seq2seq, need_train=training.do_train,
        need_validation=training.do_eval, settings=settings, seed=data.dataset_seed,
        cache_dir=args.model.cache_dir, token=args.model.token, streaming=data.streaming,
        # The other ranks read what the local main just wrote, also when it overwrote the cache.
        preprocessing_num_workers=data.preprocessing_num_workers,
        overwrite_cache=data.overwrite_cache and training.local_process_index == 0,
        keep_in_memory=data.keep_in_memory, dataset_cache_directory=data.dataset_cache_directory,
    )
    # Each node's local rank 0 tokenizes into the datasets cache first; the node's other ranks then
    # find the same samples there (lmtune.data.pipeline) instead of tokenizing again.
    with training.main_process_first(desc="data preparation"):
        return prepare_data(tokenizer, **inputs)


def _carry_chat_template(args: ParsedArgs, tokenizer) -> None:
    """A Jinja ``--chat_template`` file travels with the tokenizer saved in output_dir, which is then
    all ``lmtune chat`` or ``apply_chat_template`` need, even after the file has moved."""
    ft = args.finetune
    if ft.task == "chat" and names_template_file(ft.chat_template):
        tokenizer.chat_template = resolve_chat_format(ft.chat_template, tokenizer).template


def _report_data(args: ParsedArgs, tokenizer, data: PreparedData, *, seq2seq: bool) -> dict[str, Any]:
    """``--dry_run``: print what training would see, then stop before any weights load."""
    data_args, training = args.data, args.training
    steps = None if data.train is None else estimate_steps(
        len(data.train), per_device_batch_size=training.train_batch_size, world_size=training.world_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_train_epochs=training.num_train_epochs, max_steps=training.max_steps,
        drop_last=training.dataloader_drop_last,
    )
    train_source = data_args.dataset_name or data_args.train_file or ""
    held_out = f"{train_source} ({data_args.validation_split_percentage}% held out)"
    report = build_data_report(
        tokenizer, train=data.train, validation=data.validation, stats=data.stats, packing=data.packing,
        sources={"train": train_source, "validation": data_args.validation_file or held_out},
        max_seq_length=data_args.max_seq_length, dataset_concatenation=data_args.dataset_concatenation,
        train_on_inputs=args.finetune.train_on_inputs, steps=steps, seq2seq=seq2seq,
        max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length,
    )
    if training.process_index == 0:
        print(format_data_report(report), flush=True)
    return report.to_metrics()


def _build_model(
    args: ParsedArgs, config, tokenizer, *, bf16_storage: bool = False
) -> tuple[PreTrainedModel, torch.dtype | None]:
    """Load, quantize (QLoRA), probe packing and attach the adapter.

    ``bf16_storage``: load the weights in bf16 but compute in float32 (``check_cpu_bf16``).

    Returns:
        The model to train, and the dtype of the explicit block-diagonal mask packed rows
        need (None when position_ids isolate samples, or nothing is packed).
    """
    model_args, ft, training = args.model, args.finetune, args.training
    dtype = torch.bfloat16 if bf16_storage else resolve_dtype(training.bf16, training.fp16, ft.full_finetune)
    quant = quant_settings(args)
    model = load_model(
        model_args.model_name_or_path, config, dtype=dtype,
        revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        allow_pickle_weights=model_args.allow_pickle_weights,
        quantization_config=quantization_config(quant) if quant else None,
        device_map=quantized_device_map(training.device.type) if quant else None,
    )
    with whole_weights(model):  # ZeRO-3 loads the weights partitioned; the checks below run the model
        return adapt_model(args, model, tokenizer, dtype, quant, bf16_storage=bf16_storage)


def _collator(args: ParsedArgs, tokenizer, *, seq2seq: bool, block_mask_dtype: torch.dtype | None):
    """Seq2seq: pad inputs with the tokenizer's own pad id and labels with -100 (the model builds
    ``decoder_input_ids`` from the labels, starting with its ``decoder_start_token_id``)."""
    data_args = args.data
    if seq2seq:
        if data_args.pad_to_max_length:
            return DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=data_args.max_source_length,
                                          label_pad_token_id=IGNORE_INDEX)
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    collator = CausalLMCollator(
        tokenizer.pad_token_id, max_length=data_args.max_seq_length if data_args.pad_to_max_length else None,
        block_mask_dtype=block_mask_dtype,
    )
    if data_args.pad_to_max_length:
        collator.pad_to_multiple_of = data_args.max_seq_length
    return collator


def _evaluation_callbacks(args: ParsedArgs, data: PreparedData, *, generated_rouge: bool):
    """Task metrics at each evaluation during training (none without --eval_strategy), early stopping."""
    ft = args.finetune
    during = args.training.eval_strategy != "no" and data.validation is not None
    metrics = build_task_metrics(task_eval_settings(args), data.raw_validation,
                                 skip=[ROUGE] if generated_rouge else []) if during else []
    return evaluation_callbacks(metrics, samples=ft.eval_metric_samples, patience=ft.early_stopping_patience,
                                threshold=ft.early_stopping_threshold)


def _trainer_for_run(args: ParsedArgs, config, tokenizer, data: PreparedData, *, seq2seq: bool,
                     bf16_storage: bool, phases: StartupPhases) -> tuple[Trainer, StopOnSignal]:
    """The model with its adapter, and the Trainer around it with lmtune's callbacks and progress lines."""
    training = args.training
    model, block_mask_dtype = _build_model(args, config, tokenizer, bf16_storage=bf16_storage)
    phases.mark("model load + packing probe + adapter")
    collator = _collator(args, tokenizer, seq2seq=seq2seq, block_mask_dtype=block_mask_dtype)
    stopper = StopOnSignal()  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
    seq2seq_trainer = seq2seq and isinstance(training, Seq2SeqTrainingArguments)
    rouge_metrics = (generated_rouge_metrics(task_eval_settings(args), training, model, tokenizer)
                     if seq2seq_trainer else None)
    task_metrics, evaluation = _evaluation_callbacks(args, data, generated_rouge=rouge_metrics is not None)
    trainer = build_trainer(
        model, tokenizer, training, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=collator, eval_ppl=args.finetune.eval_ppl,
        callbacks=[stopper, StartupReport(phases), *evaluation], seq2seq=seq2seq_trainer,
        compute_metrics=rouge_metrics, task_metrics=task_metrics,
    )
    install_progress(trainer)
    transformers.utils.logging.set_verbosity(transformers_log_level(training))  # Trainer() set its own
    return trainer, stopper


def run_finetune(args: ParsedArgs) -> dict[str, Any]:
    """Run one fine-tuning job as the arguments describe.

    Returns:
        All metrics (``train_*`` and ``eval_*``), as also written to ``all_results.json``.

    Raises:
        LmtuneError: for every problem a user can cause, before training where possible.
    """
    phases = StartupPhases()  # logged at --log_level debug after the first step
    phases.mark("imports and argument parsing")
    if args.finetune.dry_run and not (args.training.do_train or args.training.do_eval):
        args.training.do_train = True  # a bare --dry_run reports what training would see
    validate_args(args, checks=(
        lambda: check_model_flags(args), lambda: check_task_evaluation(task_eval_settings(args)),
        lambda: check_report_to(args.training.report_to),
    ))
    _record_absolute_paths(args)
    args = with_device(args)
    model_args, data_args, ft, training = args.model, args.data, args.finetune, args.training
    configure_logging(training)
    if training.process_index == 0 and (notice := fsdp_notice(bool(training.fsdp), training.use_cpu)):
        logger.warning(notice)
    phases.mark("argument checks")
    args, bf16_storage = check_cpu_bf16(args)
    phases.mark("bf16 probe")
    training = args.training
    transformers.set_seed(training.seed)
    with training.main_process_first(desc="output directory"):
        checkpoint = None if ft.dry_run else prepare_output_dir(  # a dry run leaves --output_dir alone
            training.output_dir, overwrite=ft.overwrite_output_dir,
            resume_from_checkpoint=training.resume_from_checkpoint, current_args=args_to_dict(args),
        )
    config = args.model_config or load_config(  # parse_for_model has read it already
        model_args.model_name_or_path, config_name=model_args.config_name, revision=model_args.model_revision,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
    )
    seq2seq = is_seq2seq(config)
    data_args.max_seq_length = fit_to_context(data_args.max_seq_length, config, "--max_seq_length")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, tokenizer_name=model_args.tokenizer_name,
        use_fast=model_args.use_fast_tokenizer, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        special_tokens=data_args.special_tokens, model_type=config.model_type,
    )
    data = _prepare(args, tokenizer, seq2seq=seq2seq)
    ft.task = data.task or ft.task  # chat, when picked from the records' fields: lmtune chat reads it back
    _carry_chat_template(args, tokenizer)
    phases.mark("tokenizer and data")
    if ft.dry_run:
        return _report_data(args, tokenizer, data, seq2seq=seq2seq)
    if training.process_index == 0:
        if ft.overwrite_output_dir and checkpoint is None:
            clear_earlier_run(training.output_dir)
        write_run_args(training.output_dir, args_to_dict(args))
    trainer, stopper = _trainer_for_run(args, config, tokenizer, data, seq2seq=seq2seq,
                                        bf16_storage=bf16_storage, phases=phases)
    metrics: dict[str, Any] = {}
    if training.do_train:
        metrics.update(train_and_save(
            trainer, stopper, checkpoint,
            lambda result: final_train_metrics(
                result, trainer.state.log_history, trainer.state.global_step, resumed_from=checkpoint,
                samples=data.stats["train"].kept, rows=len(data.train) if data.packing is not None else None,
            ),
        ))
    metrics.update(evaluate_after_training(trainer, tokenizer, task_eval_settings(args), data))
    if training.do_train and trainer.is_world_process_zero():
        write_run_summary(training.output_dir, trainer.state.log_history, world_size=training.world_size)
    return metrics


def finetune(*, seq2seq: bool | None = None, **kwargs: Any) -> dict[str, Any]:
    """Python API: the same arguments and behaviour as the command line.

    Example:
        >>> metrics = finetune(model_name_or_path="./tiny-llama", train_file="data.json",
        ...                    output_dir="./out", do_train=True, peft="lora", max_steps=10)

    Args:
        seq2seq: Force the seq2seq argument set; by default taken from the model config.
        **kwargs: Any flag, by its name without ``--``; lists for multi-value flags.

    Returns:
        The run's metrics.
    """
    argv = config_to_argv(kwargs, source="finetune()")
    with preserved_process_state():  # the caller's logging, warnings and environment outlive the run unchanged
        return run_finetune(parse_for_model(argv, seq2seq=seq2seq))


def parse_for_model(argv: list[str], *, seq2seq: bool | None = None) -> ParsedArgs:
    """Parse argv once, set this process up (``run_setup.parse_and_set_up``), then build the arguments
    of the model's kind.

    The model's config says causal or seq2seq (``seq2seq`` forces it); ``run_finetune`` reuses it.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: for anything wrong with the command line.
    """
    flags = parse_and_set_up(argv)
    values, config = flags.values, None
    if values["model_name_or_path"]:
        config = load_config(
            values["model_name_or_path"], config_name=values["config_name"], revision=values["model_revision"],
            token=values["token"], trust_remote_code=values["trust_remote_code"], cache_dir=values["cache_dir"],
        )
    args = build_args(flags, seq2seq=is_seq2seq(config) if seq2seq is None and config is not None else bool(seq2seq))
    args.model_config = config
    return args


__all__ = ["finetune", "run_finetune", "parse_for_model"]
