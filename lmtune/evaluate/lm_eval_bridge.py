"""Benchmarks lmtune does not implement, run by EleutherAI's lm-evaluation-harness on the in-memory model.

Stage contract: a model (PEFT-wrapped or not, causal or seq2seq), its tokenizer and task names
in; flat ``<task>_<metric>`` numbers out (standard errors left out, as the reference did). The
``lm_eval`` package is optional: without it, ``run_lm_eval`` raises a ``ConfigError`` naming the
package. Tasks are registered names (``hellaswag``, ``arc_easy``, ...; their data comes from the
hub) or paths of task YAML files, which can name local data files and so run offline.

This replaces the reference's wrapper, broken in ITREX 1.4.2 (reference-internals §9.2): it
passed a list where a comma string was expected, named a task lm-eval 0.4 lacks, and gave no
tokenizer for an in-memory model.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

LM_EVAL_MISSING = (
    "these benchmarks run through EleutherAI's lm-evaluation-harness, and the lm_eval package is not "
    "installed; install it with: pip install lm_eval"
)


def lm_eval_available() -> bool:
    """True when the ``lm_eval`` package can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def flatten_results(results: dict[str, dict]) -> dict[str, float]:
    """lm_eval's ``{"task": {"acc,none": 0.5, "acc_stderr,none": 0.1}}`` -> ``{"task_acc": 0.5}``.

    A filter other than ``none`` is kept in the name (``gsm8k_exact_match_strict-match``).
    """
    flat: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            flat[f"{task}_{metric}{suffix}"] = float(value)
    return flat


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on the model as it is in memory.

    Args:
        model: The model; a seq2seq model uses lm_eval's seq2seq backend.
        tokenizer: Its tokenizer.
        tasks: Registered task names or task YAML file paths.
        limit: Documents per task (lm_eval's ``--limit``).
        batch_size: Requests per forward pass.

    Returns:
        ``<task>_<metric>`` for every metric each task reports.

    Raises:
        ConfigError: without the lm_eval package, for a task file that does not exist, or a
            task name lm_eval does not know.
    """
    missing = [task for task in tasks if task.endswith((".yaml", ".yml")) and not Path(task).is_file()]
    if missing:
        raise ConfigError(f"--lm_eval_tasks {' '.join(missing)}: no such task file.")
    if not lm_eval_available():
        raise ConfigError(f"--lm_eval_tasks {' '.join(tasks)}: {LM_EVAL_MISSING}.")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    backend = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"
    # Indexing lm_eval's thousands of built-in task files takes a minute; YAML paths don't need it.
    manager = TaskManager(include_defaults=not all(Path(task).is_file() for task in tasks))
    was_training = model.training
    model.eval()
    try:
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend=backend)
        output = lm_eval.simple_evaluate(
            model=harness_model, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False,
        )
    except KeyError as err:  # lm_eval's "not a registered task/group/tag name or valid YAML path"
        raise ConfigError(f"--lm_eval_tasks: {err.args[0] if err.args else err}. List the known names with "
                          "`lm-eval ls tasks`, or give the path of a task YAML file.") from err
    finally:
        model.train(was_training)
    metrics = flatten_results(output["results"])
    logger.info("lm_eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics
