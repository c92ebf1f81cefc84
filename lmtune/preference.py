"""One preference-tuning run (DPO or ORPO), start to end: what ``finetune_dpo`` and ``lmtune dpo`` call.

``run_preference`` reads like ``run_finetune``, whose stages it shares: check arguments, prepare
the output directory, load the tokenizer, read and check the pairs (before any weights load),
load the model, attach a new adapter or the SFT adapter to train further, train, save,
evaluate, write the model card. Only the data (pairs) and the loss (``train/preference.py``) differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from transformers import PreTrainedModel

from lmtune.argv import config_to_argv
from lmtune.data.preference import MESSAGES, PreparedPairs, prepare_preference_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.report import estimate_steps
from lmtune.errors import ConfigError
from lmtune.export.model_card import write_run_summary
from lmtune.model.load import load_config, load_model, load_tokenizer, resolve_dtype
from lmtune.model.lora_dropout import use_sixteen_bit_dropout
from lmtune.preference_args import (
    PreferenceRun,
    build_preference_parser,
    build_preference_run,
    preference_args_to_dict,
    preference_problems,
)
from lmtune.train.checkpointing import StopOnSignal, train_and_save
from lmtune.run_record import write_run_args
from lmtune.run_setup import (
    adapt_model,
    check_cpu_bf16,
    check_model_flags,
    configure_logging,
    parse_and_set_up,
    prepare_for_training,
    with_device,
)
from lmtune.train.output_dir import clear_earlier_run, prepare_output_dir
from lmtune.train.preference import REFERENCE_ADAPTER, PreferenceCollator, build_preference_trainer
from lmtune.train.preference_loss import Objective
from lmtune.train.progress import check_report_to, install_progress
from lmtune.validation import validate_args

logger = logging.getLogger(__name__)


def _validate(run: PreferenceRun) -> None:
    """Every problem of the command line in one message (``validate_args`` plus the preference flags)."""
    problems = preference_problems(run)
    try:
        validate_args(run.args)
    except ConfigError as err:
        if not problems:
            raise
        raise ConfigError(f"{err}\n  - " + "\n  - ".join(problems)) from None
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
    adapter = run.preference.adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there; name the --output_dir of an "
                          "lmtune (PEFT) fine-tuning run.")


def _prepare(run: PreferenceRun, tokenizer) -> PreparedPairs:
    data, pref, training = run.args.data, run.preference, run.args.training
    return prepare_preference_data(
        tokenizer, max_prompt_length=pref.max_prompt_length, max_length=pref.max_length,
        need_train=training.do_train, need_validation=training.do_eval,
        chat_template=run.args.finetune.chat_template, skip_invalid=data.skip_invalid_records,
        max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
        train_file=data.train_file, validation_file=data.validation_file, dataset_name=data.dataset_name,
        dataset_config_name=data.dataset_config_name, train_split=data.train_split,
        validation_split=data.validation_split, validation_split_percentage=data.validation_split_percentage,
        seed=data.dataset_seed, cache_dir=run.args.model.cache_dir, token=run.args.model.token,
    )


def _report_data(run: PreferenceRun, tokenizer, data: PreparedPairs) -> dict[str, Any]:
    """``--dry_run``: what training would see, then stop before any weights load."""
    training = run.args.training
    lines = ["lmtune dry run (preference pairs): nothing was trained, no weights were loaded."]
    for split, stats in data.stats.items():
        lines.append(f"  {split}: {stats.records} records read, {stats.skipped} skipped, {stats.describe()}; "
                     f"longest sequence {stats.longest} tokens, {stats.supervised_tokens} answer tokens")
    if data.train is not None:
        steps = estimate_steps(
            len(data.train), per_device_batch_size=training.train_batch_size, world_size=training.world_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            num_train_epochs=training.num_train_epochs, max_steps=training.max_steps,
            drop_last=training.dataloader_drop_last,
        )
        lines.append(f"  optimizer steps: {steps.total_steps} ({steps.global_batch_size} pairs per step)")
        first = data.train[0]
        labels = first["chosen_labels"]
        prompt_end = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        lines.append(f"  first pair, prompt: {tokenizer.decode(first['chosen_input_ids'][:prompt_end])!r}")
        for side in ("chosen", "rejected"):
            answer = [t for t in first[f"{side}_labels"] if t != IGNORE_INDEX]
            lines.append(f"  first pair, {side} (supervised): {tokenizer.decode(answer)!r}")
    if training.process_index == 0:
        print("\n".join(lines), flush=True)
    return {f"{split}_{key}": getattr(stats, key) for split, stats in data.stats.items()
            for key in ("records", "pairs", "skipped", "prompts_truncated", "chosen_truncated", "rejected_truncated")}


def _load_sft_adapter(model: PreTrainedModel, adapter: str, *, with_reference: bool) -> PeftModel:
    """The SFT adapter, trainable; with ``with_reference`` loaded again, frozen, as the reference."""
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if with_reference:
        model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.print_trainable_parameters()
    return model


def _build_policy(run: PreferenceRun, config, tokenizer, *, bf16_storage: bool) -> PreTrainedModel:
    """Load the base model and attach a new adapter (``adapt_model``, as for SFT) or the SFT adapter."""
    model_args, ft, training, pref = run.args.model, run.args.finetune, run.args.training, run.preference
    dtype = torch.bfloat16 if bf16_storage else resolve_dtype(training.bf16, training.fp16, ft.full_finetune)
    model = load_model(
        model_args.model_name_or_path, config, dtype=dtype, revision=model_args.model_revision,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        allow_pickle_weights=model_args.allow_pickle_weights,
    )
    if not pref.adapter:
        return adapt_model(run.args, model, tokenizer, dtype, None, bf16_storage=bf16_storage)[0]
    logger.info("--adapter %s: training that adapter further, with its own configuration (the --lora_* flags "
                "and --peft do not apply).", pref.adapter)
    model, _ = prepare_for_training(run.args, model, tokenizer, dtype, None, bf16_storage=bf16_storage)
    model = _load_sft_adapter(model, pref.adapter, with_reference=not (pref.orpo or pref.precompute_ref_log_probs))
    use_sixteen_bit_dropout(model)
    return model


def _resolved_args(run: PreferenceRun, data: PreparedPairs) -> dict[str, Any]:
    """The arguments saved in ``lmtune_args.json``; pairs of messages were rendered in the chat format,
    which ``lmtune chat`` then uses too (it picks the prompt format from the saved ``task``)."""
    resolved = preference_args_to_dict(run)
    if any(stats.format == MESSAGES for stats in data.stats.values()):
        resolved["finetune"]["task"] = "chat"
    return resolved


def _reference_kind(run: PreferenceRun) -> str:
    """Where the reference log-probabilities come from (``train.preference.reference_context``)."""
    pref = run.preference
    if pref.adapter:
        return "policy" if pref.precompute_ref_log_probs else "adapter"
    return "policy" if run.args.finetune.full_finetune else "base"


def run_preference(run: PreferenceRun) -> dict[str, Any]:
    """Run one DPO or ORPO job as the arguments describe.

    Returns:
        All metrics (``train_*`` and ``eval_*``), as also written to ``all_results.json``.

    Raises:
        LmtuneError: for every problem a user can cause, before training where possible.
    """
    _validate(run)
    check_model_flags(run.args)
    check_report_to(run.args.training.report_to)
    run.args = with_device(run.args)
    configure_logging(run.args.training)
    run.args, bf16_storage = check_cpu_bf16(run.args)
    model_args, ft, training, pref = run.args.model, run.args.finetune, run.args.training, run.preference
    transformers.set_seed(training.seed)
    with training.main_process_first(desc="output directory"):
        checkpoint = None if ft.dry_run else prepare_output_dir(
            training.output_dir, overwrite=ft.overwrite_output_dir,
            resume_from_checkpoint=training.resume_from_checkpoint, current_args=preference_args_to_dict(run),
        )
    config = load_config(model_args.model_name_or_path, config_name=model_args.config_name,
                         revision=model_args.model_revision, token=model_args.token,
                         trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, tokenizer_name=model_args.tokenizer_name,
        use_fast=model_args.use_fast_tokenizer, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        special_tokens=run.args.data.special_tokens, model_type=config.model_type,
    )
    data = _prepare(run, tokenizer)
    if ft.dry_run:
        return _report_data(run, tokenizer, data)
    if training.process_index == 0:
        if ft.overwrite_output_dir and checkpoint is None:
            clear_earlier_run(training.output_dir)
        write_run_args(training.output_dir, _resolved_args(run, data))
    model = _build_policy(run, config, tokenizer, bf16_storage=bf16_storage)
    collator = PreferenceCollator(tokenizer.pad_token_id, max_length=pref.max_length if pref.pad_max else None)
    stopper = StopOnSignal()
    trainer = build_preference_trainer(
        model, tokenizer, training, objective=Objective(pref.beta, pref.loss_type, pref.orpo),
        train_dataset=data.train, eval_dataset=data.validation, data_collator=collator, callbacks=[stopper],
        reference=_reference_kind(run),
    )
    install_progress(trainer)
    if pref.precompute_ref_log_probs:  # before train() loads a checkpoint: the reference as it was
        trainer.train_dataset = data.train and trainer.add_reference_logps(data.train)
        trainer.eval_dataset = data.validation and trainer.add_reference_logps(data.validation)
    return _train_and_report(run, trainer, data, checkpoint, stopper)


def _train_and_report(run: PreferenceRun, trainer, data: PreparedPairs, checkpoint: str | None,
                      stopper: StopOnSignal) -> dict[str, Any]:
    training = run.args.training
    metrics: dict[str, Any] = {}
    if training.do_train:
        metrics.update(train_and_save(
            trainer, stopper, checkpoint, lambda result: dict(result, train_samples=len(data.train)),
        ))
    if training.do_eval:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(data.validation))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training.do_train and trainer.is_world_process_zero():
        write_run_summary(training.output_dir, trainer.state.log_history, world_size=training.world_size)
    return metrics


def finetune_dpo(**kwargs: Any) -> dict[str, Any]:
    """Python API: the same arguments and behaviour as ``finetune_dpo`` on the command line.

    Example:
        >>> metrics = finetune_dpo(model_name_or_path="./tiny-llama", train_file="pairs.jsonl",
        ...                        output_dir="./out", do_train=True, max_steps=10, beta=0.1)
    """
    return run_preference(parse_preference(config_to_argv(kwargs, source="finetune_dpo()")))


def parse_preference(argv: list[str]) -> PreferenceRun:
    """Parse argv once and set this process up (``run_setup.parse_and_set_up``, as for fine-tuning).

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: for anything wrong with the command line.
    """
    return build_preference_run(parse_and_set_up(argv, parser=build_preference_parser()))


__all__ = ["finetune_dpo", "parse_preference", "run_preference"]
