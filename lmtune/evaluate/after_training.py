"""After training: eval loss, then the task's own evaluations, written where the Trainer writes metrics.

``run_finetune`` hands over its Trainer (duck-typed: this stage never imports ``train``),
the parsed arguments and the prepared data; ROUGE of generated summaries can also run at
every evaluation during training (``generated_rouge_metrics``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from lmtune.args import ParsedArgs
from lmtune.data.prepare import PreparedData
from lmtune.evaluate.tasks import ROUGE, TaskEvalSettings, build_rouge_metrics, run_task_evaluation


def generated_rouge_metrics(args: ParsedArgs, model: PreTrainedModel, tokenizer):
    """``--predict_with_generate --task summarization``: ROUGE of generated text at every evaluation.

    Generation then runs with ``--max_target_length`` new tokens and ``--num_beams`` beams, unless
    ``--generation_max_length`` / ``--generation_num_beams`` say otherwise (the model's own
    generation config would stop T5 after 20 tokens).
    """
    training, data_args = args.training, args.data
    if not (training.predict_with_generate and args.finetune.task == "summarization"):
        return None
    generation = model.generation_config
    if training.generation_max_length is None:
        generation.max_new_tokens = data_args.max_target_length
    if training.generation_num_beams is None:
        generation.num_beams = data_args.num_beams
    return build_rouge_metrics(tokenizer)


def task_eval_settings(args: ParsedArgs) -> TaskEvalSettings:
    """The evaluation settings the command line implies (checked before training by ``check_task_evaluation``)."""
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


def _last_step_evaluation(trainer) -> dict[str, Any] | None:
    """The metrics of the evaluation the Trainer ran at the final step (``--eval_strategy steps``
    or ``epoch``), if the model is still the one it evaluated: evaluating again gives the same numbers."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if trainer.args.load_best_model_at_end or last is None or last.get("step") != state.global_step:
        return None
    # The task metrics of evaluations during training scored a subset; after training they score it all.
    subset = set(getattr(getattr(trainer, "task_metrics", None), "keys", None) or [])
    return {key: value for key, value in last.items() if key != "step" and key not in subset}


def evaluate_after_training(trainer, tokenizer, args: ParsedArgs, data: PreparedData) -> dict[str, Any]:
    """Eval loss (all processes), then the task's own evaluations on the main process only.

    ROUGE joins the ``eval_*`` metrics (eval_results.json); HumanEval and the ``--lm_eval_tasks``
    benchmarks go to lm_eval_results.json; both reach all_results.json.
    """
    training = args.training
    eval_metrics: dict[str, Any] = {}
    if training.do_eval:
        eval_metrics = _last_step_evaluation(trainer) or trainer.evaluate()
        eval_metrics["eval_samples"] = len(data.validation)
    benchmarks: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        results = run_task_evaluation(
            trainer.model, tokenizer, task_eval_settings(args), validation_records=data.raw_validation,
            output_dir=training.output_dir, skip=[ROUGE] if "eval_rouge1" in eval_metrics else [],
        )
        eval_metrics.update(results.eval)
        benchmarks = results.benchmarks
    if training.do_eval:
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if benchmarks:
        trainer.log_metrics("lm_eval", benchmarks)
        trainer.save_metrics("lm_eval", benchmarks)
    return {**eval_metrics, **benchmarks}
