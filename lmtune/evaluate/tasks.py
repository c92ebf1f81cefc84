"""Post-training task evaluations: the metric each ``--task`` is judged by, on the in-memory model.

Stage contract: a trained model (PEFT-wrapped or not, causal or seq2seq), its tokenizer and flat
settings in; metrics out, and what was generated written beside them. ``plan_evaluations`` says
which evaluations a run gets, as the reference chose them:

- ``--task summarization`` with ``--do_eval``: ROUGE-1/2/L/Lsum (0-100) on summaries generated
  from the validation records, in batches (``eval_rouge*``; ``eval_generations.jsonl``). The
  prompt is the training prompt (``summarization_prompts``); references are the whole highlights.
- ``--task code-generation`` with ``--do_lm_eval``: HumanEval pass@k (``humaneval_pass@k``;
  every completion with its result in ``humaneval_results.jsonl``), and MBPP the same way
  with ``--mbpp_file`` (``mbpp_pass@k``, ``mbpp_results.jsonl``).
- any other task with ``--do_lm_eval``: ``--lm_eval_tasks``. TruthfulQA MC1/MC2 are built in
  (``truthfulqa_mc`` is the reference's name for both); other names, or task YAML files, go to
  the ``lm_eval`` package with the in-memory model.

Generation is deterministic unless HumanEval asks for samples; nothing here trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

from lmtune.data.formats import to_examples
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.seq2seq import summary_source_budget
from lmtune.data.summarization import SUMMARIZATION_FORMAT, summarization_prompts
from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate.generation import generate_batched
from lmtune.evaluate.humaneval import STOP_SEQUENCES, check_completions, evaluate_humaneval, load_humaneval
from lmtune.evaluate.mbpp import MBPP_STOP_SEQUENCES, load_mbpp
from lmtune.evaluate.lm_eval_bridge import LM_EVAL_MISSING, lm_eval_available, run_lm_eval
from lmtune.evaluate.multiple_choice import score_truthfulqa
from lmtune.evaluate.rouge import compute_rouge
from lmtune.evaluate.seq2seq_scoring import score_truthfulqa_seq2seq
from lmtune.evaluate.truthfulqa import load_truthfulqa

logger = logging.getLogger(__name__)

# Built-in benchmark names -> the metrics they report (truthfulqa_mc is the reference's lm-eval 0.3 name).
TRUTHFULQA_TASKS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc": ("truthfulqa_mc1", "truthfulqa_mc2"),
    "truthfulqa_mc1": ("truthfulqa_mc1",),
    "truthfulqa_mc2": ("truthfulqa_mc2",),
}
PASS_AT_K = (1, 10, 100)
GENERATIONS_FILE = "eval_generations.jsonl"
HUMANEVAL_RESULTS_FILE = "humaneval_results.jsonl"
ROUGE = "rouge"
HUMANEVAL = "humaneval"
MBPP = "mbpp"
BENCHMARKS = "benchmarks"


@dataclass(frozen=True)
class TaskEvalSettings:
    """What to evaluate after training, as flat copies of the flags."""

    task: str = "completion"
    do_eval: bool = False
    do_lm_eval: bool = False
    lm_eval_tasks: tuple[str, ...] = ("truthfulqa_mc",)
    lm_eval_limit: int | None = None
    truthfulqa_file: str | None = None
    max_source_length: int = 384
    max_target_length: int = 128
    num_beams: int = 1
    batch_size: int = 8
    humaneval_file: str | None = None
    mbpp_file: str | None = None
    humaneval_limit: int | None = None
    humaneval_n_samples: int = 1
    humaneval_temperature: float = 0.2
    humaneval_top_p: float = 0.95
    humaneval_max_new_tokens: int = 512
    skip_invalid_records: bool = False
    cache_dir: str | None = None


def plan_evaluations(settings: TaskEvalSettings) -> list[str]:
    """The evaluations a run gets: ``rouge``, ``humaneval`` and/or ``benchmarks``."""
    plan = []
    if settings.task == "summarization" and settings.do_eval:
        plan.append(ROUGE)
    if settings.do_lm_eval:
        plan.append(HUMANEVAL if settings.task == "code-generation" else BENCHMARKS)
    return plan


def check_task_evaluation(settings: TaskEvalSettings) -> None:
    """Fail before training when a planned evaluation cannot run.

    Raises:
        ConfigError: HumanEval without a problems file, or benchmarks that need the missing
            ``lm_eval`` package, listed together.
    """
    plan, problems = plan_evaluations(settings), []
    if HUMANEVAL in plan and not (settings.humaneval_file or settings.mbpp_file):
        problems.append("HumanEval needs --humaneval_file HumanEval.jsonl.gz (the public file of openai/human-eval)")
    external = [t for t in settings.lm_eval_tasks if t not in TRUTHFULQA_TASKS]
    if BENCHMARKS in plan and external and not lm_eval_available():
        problems.append(f"--lm_eval_tasks {' '.join(external)}: {LM_EVAL_MISSING}; built in are "
                        f"{', '.join(TRUTHFULQA_TASKS)}")
    if problems:
        raise ConfigError("post-training evaluation cannot run:\n  - " + "\n  - ".join(problems))


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_summaries(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict], *, max_source_length: int,
    max_target_length: int, num_beams: int = 1, batch_size: int = 8, skip_invalid: bool = False,
    source: str = "validation",
) -> tuple[list[str], list[str]]:
    """(generated summaries, reference highlights) of ``records``, prompted as training rendered them.

    Raises:
        DataFormatError: for records without article/highlights.
    """
    columns = records[0].keys() if records else ()
    examples = to_examples(records, columns, source, skip_invalid=skip_invalid, formats=(SUMMARIZATION_FORMAT,))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    budget = summary_source_budget(tokenizer, max_source_length) if seq2seq else max_source_length
    prompts = summarization_prompts(examples, tokenizer, budget, source=source)
    predictions = [text.strip() for text in generate_batched(
        model, tokenizer, prompts, max_new_tokens=max_target_length, num_beams=num_beams, batch_size=batch_size,
    )]
    return predictions, [example["highlights"] for example in examples]


def evaluate_summarization(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[dict],
    *,
    max_source_length: int,
    max_target_length: int,
    num_beams: int = 1,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    skip_invalid: bool = False,
    source: str = "validation",
) -> dict[str, float]:
    """ROUGE of summaries generated from the training prompts against the records' highlights.

    Args:
        model: Causal or seq2seq; prompted exactly as training rendered the article.
        tokenizer: Its tokenizer.
        records: ``article``/``highlights`` records (e.g. the validation split).
        max_source_length: Prompt budget used in training.
        max_target_length: Most new tokens per summary.
        num_beams: 1 is greedy.
        batch_size: Prompts per ``generate`` call.
        output_dir: Where ``eval_generations.jsonl`` goes (not written when None).
        skip_invalid: Leave out malformed records instead of raising.
        source: Name of the records, for messages.

    Returns:
        ``eval_rouge1``, ``eval_rouge2``, ``eval_rougeL``, ``eval_rougeLsum`` (0-100) and
        ``eval_rouge_samples``.

    Raises:
        DataFormatError: for records without article/highlights.
    """
    records = list(records)
    predictions, references = generate_summaries(
        model, tokenizer, records, max_source_length=max_source_length, max_target_length=max_target_length,
        num_beams=num_beams, batch_size=batch_size, skip_invalid=skip_invalid, source=source,
    )
    scores = compute_rouge(predictions, references)
    if output_dir is not None:
        kept = len(records) == len(predictions)
        ids = [record.get("id") for record in records] if kept else [None] * len(predictions)
        _write_jsonl(Path(output_dir) / GENERATIONS_FILE, (
            {"index": i, "id": ids[i], "prediction": p, "reference": r}
            for i, (p, r) in enumerate(zip(predictions, references))
        ))
    metrics = {f"eval_{name}": round(value, 4) for name, value in scores.items()}
    metrics["eval_rouge_samples"] = len(predictions)
    return metrics


def evaluate_code_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    humaneval_file: str | Path,
    benchmark: str = HUMANEVAL,
    limit: int | None = None,
    n_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
) -> dict[str, float]:
    """HumanEval (or, with ``benchmark="mbpp"``, MBPP) pass@k of the model, each completion run in the sandbox.

    Returns:
        ``<benchmark>_pass@k`` for every k of 1, 10, 100 up to ``n_samples``, plus
        ``<benchmark>_problems`` and ``<benchmark>_n_samples``.

    Raises:
        DataFormatError: for a missing or malformed problems file.
        ConfigError: for out-of-range counts.
    """
    problems, stops = load_code_problems(humaneval_file, benchmark)
    k = tuple(value for value in PASS_AT_K if value <= n_samples)
    result = evaluate_humaneval(
        model, tokenizer, problems, n_samples=n_samples, k=k, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, batch_size=batch_size, limit=limit, stop_sequences=stops,
        metric_prefix=benchmark,
    )
    per_problem = result.pop(f"{benchmark}_per_problem")
    if output_dir is not None:
        _write_jsonl(Path(output_dir) / f"{benchmark}_results.jsonl", per_problem)
    return {**result, f"{benchmark}_problems": len(per_problem), f"{benchmark}_n_samples": n_samples}


def load_code_problems(path: str | Path, benchmark: str = HUMANEVAL) -> tuple[list[dict], tuple[str, ...]]:
    """The problems of a HumanEval or MBPP file, and where that benchmark's completions stop."""
    if benchmark == MBPP:
        return load_mbpp(path), MBPP_STOP_SEQUENCES
    return load_humaneval(path), STOP_SEQUENCES


def score_reference_solutions(
    humaneval_file: str | Path, *, limit: int | None = None, output_dir: str | Path | None = None,
    workers: int = 2, timeout: float = 10.0, benchmark: str = HUMANEVAL,
) -> dict[str, float]:
    """Run every problem's own ``canonical_solution`` through the harness: pass@1 must be 1.0.

    Raises:
        DataFormatError: if the file is missing or a problem has no canonical solution.
        ConfigError: for ``limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--humaneval_limit must be > 0 (got {limit})")
    problems = load_code_problems(humaneval_file, benchmark)[0][:limit]
    lacking = [p["task_id"] for p in problems if not isinstance(p.get("canonical_solution"), str)]
    if lacking:
        raise DataFormatError(f"{humaneval_file}: {len(lacking)} problem(s) have no canonical_solution "
                              f"(first: {lacking[0]}); --reference_solutions needs the official file.")
    outcomes = check_completions([(p, p["canonical_solution"]) for p in problems], timeout=timeout, workers=workers)
    if output_dir is not None:
        _write_jsonl(Path(output_dir) / f"{benchmark}_results.jsonl", (
            {"task_id": p["task_id"], "passed": [ok], "results": [why]} for p, (ok, why) in zip(problems, outcomes)
        ))
    failed = [p["task_id"] for p, (ok, _) in zip(problems, outcomes) if not ok]
    if failed:
        logger.warning("reference solutions failing the harness: %s", ", ".join(failed[:10]))
    return {f"{benchmark}_pass@1": (len(problems) - len(failed)) / len(problems),
            f"{benchmark}_problems": len(problems)}


def evaluate_benchmarks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Iterable[str],
    *,
    truthfulqa_file: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Log-likelihood benchmarks: TruthfulQA MC1/MC2 built in (causal and seq2seq models), anything
    else through ``lm_eval``.

    Returns:
        ``truthfulqa_mc1``/``truthfulqa_mc2`` as asked, and ``<task>_<metric>`` from lm_eval.

    Raises:
        ConfigError: for tasks that need the missing ``lm_eval`` package, or unknown lm_eval tasks.
        DataFormatError: for a malformed TruthfulQA file.
    """
    tasks = list(dict.fromkeys(tasks))
    builtin = [t for t in tasks if t in TRUTHFULQA_TASKS]
    external = [t for t in tasks if t not in TRUTHFULQA_TASKS]
    metrics: dict[str, float] = {}
    if builtin:
        questions = load_truthfulqa(truthfulqa_file, cache_dir=cache_dir)
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        score = score_truthfulqa_seq2seq if seq2seq else score_truthfulqa
        scores = score(model, tokenizer, questions, batch_size=batch_size, limit=limit)
        for key in dict.fromkeys(key for task in builtin for key in TRUTHFULQA_TASKS[task]):
            metrics[key] = scores[key]
        metrics["truthfulqa_questions"] = min(len(questions), limit or len(questions))
    if external:
        metrics.update(run_lm_eval(model, tokenizer, external, limit=limit, batch_size=batch_size))
    return metrics


@dataclass
class TaskEvalResults:
    """Metrics of the post-training evaluations: ``eval`` ones join eval_results.json, the rest
    (benchmarks) are reported on their own."""

    eval: dict[str, Any]
    benchmarks: dict[str, Any]


def run_task_evaluation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: TaskEvalSettings,
    *,
    validation_records: Iterable[dict] | None = None,
    output_dir: str | Path | None = None,
    skip: Iterable[str] = (),
) -> TaskEvalResults:
    """Run the evaluations ``plan_evaluations`` names for these settings.

    Args:
        model: The trained model.
        tokenizer: Its tokenizer.
        settings: The flags.
        validation_records: Raw validation records (summarization ROUGE).
        output_dir: Where generations and per-problem results are written.
        skip: Planned evaluations already done elsewhere (``rouge`` when the Seq2SeqTrainer
            computed it from generated text).

    Raises:
        ConfigError, DataFormatError: as the individual evaluations raise them.
    """
    results = TaskEvalResults(eval={}, benchmarks={})
    for step in [step for step in plan_evaluations(settings) if step not in set(skip)]:
        if step == ROUGE:
            if validation_records is None:
                raise ConfigError("summarization ROUGE needs the validation records; pass --do_eval with validation data.")
            results.eval.update(evaluate_summarization(
                model, tokenizer, validation_records, max_source_length=settings.max_source_length,
                max_target_length=settings.max_target_length, num_beams=settings.num_beams,
                batch_size=settings.batch_size, output_dir=output_dir, skip_invalid=settings.skip_invalid_records,
            ))
        elif step == HUMANEVAL:
            for benchmark, path in ((HUMANEVAL, settings.humaneval_file), (MBPP, settings.mbpp_file)):
                if path:
                    results.benchmarks.update(evaluate_code_generation(
                        model, tokenizer, humaneval_file=path, benchmark=benchmark, limit=settings.humaneval_limit,
                        n_samples=settings.humaneval_n_samples, temperature=settings.humaneval_temperature,
                        top_p=settings.humaneval_top_p, max_new_tokens=settings.humaneval_max_new_tokens,
                        batch_size=settings.batch_size, output_dir=output_dir,
                    ))
        else:
            results.benchmarks.update(evaluate_benchmarks(
                model, tokenizer, settings.lm_eval_tasks, truthfulqa_file=settings.truthfulqa_file,
                limit=settings.lm_eval_limit, batch_size=settings.batch_size, cache_dir=settings.cache_dir,
            ))
    return results


def build_rouge_metrics(tokenizer: PreTrainedTokenizerBase) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for ``Seq2SeqTrainer`` with ``--predict_with_generate``: ROUGE of the
    generated ids against the label ids (the targets as trained, cut to ``max_target_length``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        generated = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        generated = np.where(np.asarray(generated) < 0, pad, generated)
        labels = np.where(np.asarray(prediction.label_ids) == IGNORE_INDEX, pad, prediction.label_ids)
        predictions = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {name: round(value, 4) for name, value in compute_rouge(predictions, references).items()}

    return compute
