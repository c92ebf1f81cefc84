"""After training: eval loss, then the task's own evaluations, written where the Trainer writes metrics.

``run_finetune`` hands over its Trainer (duck-typed: this stage never imports ``train``),
the evaluation settings its arguments imply (``TaskEvalSettings``) and the prepared data;
ROUGE of generated summaries can also run at every evaluation during training
(``generated_rouge_metrics``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, Seq2SeqTrainingArguments

from lmtune.data.prepare import PreparedData
from lmtune.evaluate.tasks import ROUGE, TaskEvalSettings, build_rouge_metrics, run_task_evaluation


def generated_rouge_metrics(settings: TaskEvalSettings, training: Seq2SeqTrainingArguments,
                            model: PreTrainedModel, tokenizer):
    """``--predict_with_generate --task summarization``: ROUGE of generated text at every evaluation.

    Generation then runs with ``--max_target_length`` new tokens and ``--num_beams`` beams, unless
    ``--generation_max_length`` / ``--generation_num_beams`` say otherwise (the model's own
    generation config would stop T5 after 20 tokens).
    """
    if not (training.predict_with_generate and settings.task == "summarization"):
        return None
    generation = model.generation_config
    if training.generation_max_length is None:
        generation.max_new_tokens = settings.max_target_length
    if training.generation_num_beams is None:
        generation.num_beams = settings.num_beams
    return build_rouge_metrics(tokenizer)


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


def evaluate_after_training(trainer, tokenizer, settings: TaskEvalSettings, data: PreparedData) -> dict[str, Any]:
    """Eval loss (all processes), then the task's own evaluations on the main process only.

    ROUGE joins the ``eval_*`` metrics (eval_results.json); HumanEval and the ``--lm_eval_tasks``
    benchmarks go to lm_eval_results.json; both reach all_results.json.
    """
    eval_metrics: dict[str, Any] = {}
    if settings.do_eval:
        eval_metrics = _last_step_evaluation(trainer) or trainer.evaluate()
        eval_metrics["eval_samples"] = len(data.validation)
    benchmarks: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        results = run_task_evaluation(
            trainer.model, tokenizer, settings, validation_records=data.raw_validation,
            output_dir=trainer.args.output_dir, skip=[ROUGE] if "eval_rouge1" in eval_metrics else [],
        )
        eval_metrics.update(results.eval)
        benchmarks = results.benchmarks
    if settings.do_eval:
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if benchmarks:
        trainer.log_metrics("lm_eval", benchmarks)
        trainer.save_metrics("lm_eval", benchmarks)
    return {**eval_metrics, **benchmarks}
