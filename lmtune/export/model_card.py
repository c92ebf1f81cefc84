"""The model card of a finished run: ``output_dir/README.md``, written from the run's own files.

Contract: ``write_model_card(output_dir)`` reads only what the run left in ``output_dir``
(``lmtune_args.json`` for the resolved arguments and library versions,
``trainer_state.json`` for steps, ``all_results.json`` for final metrics,
``adapter_config.json`` for the adapter as PEFT resolved it) and writes the card last, so it
replaces the template card PEFT writes with every ``save_pretrained``. The YAML header
carries the Hub's model-card fields (``base_model``, ``library_name``, ``tags``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError
from lmtune.export.plots import LOSS_CURVE_FILE, METRICS_CURVE_FILE, plot_loss_curve, plot_metric_curves
from lmtune.model.gguf import is_gguf_path
from lmtune.run_record import ARGS_FILE

CARD_FILE = "README.md"
# Adapter settings worth a row in the card, as named in adapter_config.json.
ADAPTER_KEYS = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "bias",
    "num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type", "adapter_len",
    "adapter_layers", "feedforward_modules",
)
TRAINING_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "max_grad_norm", "optim",
    "bf16", "fp16", "activation_checkpointing", "seed",
)
LIBRARIES = ("python", "lmtune", "transformers", "peft", "torch", "datasets", "accelerate", "tokenizers")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        value = ", ".join(str(v) for v in sorted(value, key=str))
    elif isinstance(value, float):
        value = f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("setting", "value")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {name} | {_cell(value)} |" for name, value in rows]


def _data_lines(data: dict[str, Any], results: dict[str, Any]) -> list[str]:
    if data.get("dataset_name"):
        config = f" ({data['dataset_config_name']})" if data.get("dataset_config_name") else ""
        train = f"`{data['dataset_name']}`{config}, split {data.get('train_split') or 'train'}"
    else:
        train = f"`{data.get('train_file')}`"
    samples = f", {results['train_samples']} samples" if "train_samples" in results else ""
    if "train_rows" in results:
        samples += f" packed into {results['train_rows']} rows"
    lines = [f"- training: {train}{samples}"]
    if data.get("validation_file"):
        lines.append(f"- validation: `{data['validation_file']}`")
    elif data.get("validation_split_percentage"):
        lines.append(f"- validation: {data['validation_split_percentage']}% held out of the training data")
    elif data.get("validation_split"):
        lines.append(f"- validation: split {data['validation_split']}")
    if "eval_samples" in results:
        lines[-1] += f", {results['eval_samples']} samples"
    packing = "packed into full rows (--dataset_concatenation)" if data.get("dataset_concatenation") else "not packed"
    lines.append(f"- samples of at most {data.get('max_seq_length')} tokens, {packing}")
    return lines


PEFT_NAMES = {"lora": "LoRA", "ptun": "P-tuning", "prefix": "prefix-tuning", "prompt": "prompt-tuning",
              "llama_adapter": "LLaMA-Adapter", "ia3": "IA3"}


def _method_name(finetune: dict[str, Any]) -> str:
    name = PEFT_NAMES.get(finetune.get("peft"), str(finetune.get("peft")))
    return "DoRA" if name == "LoRA" and finetune.get("use_dora") else name


def _method_rows(finetune: dict[str, Any], adapter: dict[str, Any]) -> list[tuple[str, Any]]:
    if finetune.get("full_finetune"):
        return [("method", "full fine-tuning (every weight trained)")]
    rows: list[tuple[str, Any]] = [("method", f"{_method_name(finetune)} (--peft {finetune.get('peft')})")]
    rows += [(key, adapter[key]) for key in ADAPTER_KEYS if adapter.get(key) not in (None, [], "")]
    rows.append(("train_on_inputs", finetune.get("train_on_inputs")))
    return rows


def _preference_rows(preference: dict[str, Any]) -> list[tuple[str, Any]]:
    """A DPO/ORPO run (``lmtune dpo``): the objective and its beta, first in the Method table."""
    if not preference:
        return []
    if preference.get("orpo"):
        objective, reference = "ORPO (odds-ratio preference optimization)", "none (ORPO has no reference)"
    else:
        objective = f"DPO, {preference.get('loss_type')} loss"
        reference = f"the SFT adapter {preference['adapter']}, frozen" if preference.get("adapter") else \
            "the base model (adapter disabled)"
    rows = [("preference objective", objective), ("beta", preference.get("beta")), ("reference", reference)]
    return rows + [(key, preference.get(key)) for key in ("max_prompt_length", "max_length")]


def _usage_lines(base: str, output_dir: str, full: bool) -> list[str]:
    if full:
        load = [f'model = AutoModelForCausalLM.from_pretrained("{output_dir}")']
        chat = f"lmtune chat --model_name_or_path {output_dir}"
        imports = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    else:
        # transformers reads a GGUF file from its directory, named by gguf_file= (and dequantizes it).
        source = (f'"{Path(base).parent}", gguf_file="{Path(base).name}"' if is_gguf_path(base) else f'"{base}"')
        load = [f"base = AutoModelForCausalLM.from_pretrained({source})",
                f'model = PeftModel.from_pretrained(base, "{output_dir}")']
        chat = f"lmtune chat --model_name_or_path {base} --adapter {output_dir}"
        imports = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    return [
        "Load it in Python:", "", "```python", *imports, "", *load,
        f'tokenizer = AutoTokenizer.from_pretrained("{output_dir}")', "```", "",
        "Chat with it in the format it was trained with:", "", "```bash", chat, "```",
    ]


def _results_lines(state: dict[str, Any], results: dict[str, Any], training: dict[str, Any], plot: bool,
                   metrics_plot: bool = False) -> list[str]:
    max_steps = state.get("max_steps") or training.get("max_steps")
    of = f" of {max_steps}" if max_steps and max_steps > 0 else ""
    lines = [f"Trained {state.get('global_step', '?')}{of} optimizer steps "
             f"({float(state.get('epoch') or 0):.2f} epochs).", ""]
    if training.get("load_best_model_at_end") and state.get("best_global_step"):
        lines[0] += (f" These weights are the best checkpoint, step {state['best_global_step']} "
                     f"({training.get('metric_for_best_model')} = {_cell(state.get('best_metric'))}).")
    shown = ("train_loss", "eval_loss", "eval_ppl", "train_runtime", "train_samples_per_second")
    rows = [(key, results[key]) for key in shown if key in results]
    rows += [(key, value) for key, value in results.items()
             if key not in shown and key.startswith("eval_") and isinstance(value, (int, float))
             and not key.endswith(("_runtime", "_per_second", "_samples"))]
    lines += _table(rows, ("metric", "value")) if rows else ["No final metrics were recorded."]
    if plot:
        lines += ["", f"![train and eval loss against optimizer steps]({LOSS_CURVE_FILE})"]
    if metrics_plot:
        lines += ["", f"![task metrics of the evaluations during training]({METRICS_CURVE_FILE})"]
    return lines


def render_model_card(
    run: dict[str, Any],
    state: dict[str, Any],
    results: dict[str, Any],
    adapter: dict[str, Any],
    *,
    output_dir: str,
    plot: bool = False,
    world_size: int | None = None,
    metrics_plot: bool = False,
) -> str:
    """The card's Markdown from the run's saved files (already parsed)."""
    args, versions = run.get("args", {}), run.get("versions", {})
    model, data, finetune, training = (args.get(k, {}) for k in ("model", "data", "finetune", "training"))
    preference = args.get("preference", {})
    base, full = model.get("model_name_or_path") or "?", bool(finetune.get("full_finetune"))
    method = "full fine-tune" if full else f"{_method_name(finetune)} adapter"
    tags = ["lmtune", "text-generation"] + ([] if full else [str(finetune.get("peft"))])
    header = ["---", f"base_model: {base}", f"library_name: {'transformers' if full else 'peft'}",
              "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]
    hyper = [(key, training[key]) for key in TRAINING_KEYS if key in training]
    if world_size:
        batch = training.get("per_device_train_batch_size", 1) * world_size * training.get(
            "gradient_accumulation_steps", 1)
        hyper += [("processes", world_size), ("global batch size", batch)]
    purpose = (f"on chosen/rejected pairs with {_preference_rows(preference)[0][1]}, beta {preference.get('beta')}."
               if preference else f"for the `{finetune.get('task', 'completion')}` task.")
    body = [
        f"# {Path(output_dir).name}", "",
        f"A {method} for `{base}`, fine-tuned with lmtune {versions.get('lmtune', '')} {purpose}", "",
        "## Data", "", *_data_lines(data, results), "",
        "## Method", "", *_table(_preference_rows(preference) + _method_rows(finetune, adapter)), "",
        "## Training hyperparameters", "", *_table(hyper), "",
        "## Results", "", *_results_lines(state, results, training, plot, metrics_plot), "",
        "## How to use", "", *_usage_lines(base, output_dir, full), "",
        "## Library versions", "", *_table([(lib, versions.get(lib)) for lib in LIBRARIES if versions.get(lib)],
                                          ("library", "version")), "",
        f"All resolved arguments are in `{ARGS_FILE}`.",
    ]
    return "\n".join(header + body) + "\n"


def write_model_card(output_dir: str | Path, *, world_size: int | None = None) -> Path:
    """Write ``output_dir/README.md`` for the finished run in ``output_dir``.

    Call it after the last save: PEFT's ``save_pretrained`` writes its own template card.

    Args:
        output_dir: The run's ``--output_dir``.
        world_size: Training processes, for the global batch size (not in the saved arguments).

    Returns:
        The card's path.

    Raises:
        ConfigError: if ``output_dir`` holds no lmtune run (no ``lmtune_args.json``).
    """
    path = Path(output_dir)
    run = _read_json(path / ARGS_FILE)
    if not run:
        raise ConfigError(f"{output_dir} holds no {ARGS_FILE}: it is not the output of an lmtune run.")
    card = render_model_card(
        run, _read_json(path / "trainer_state.json"), _read_json(path / "all_results.json"),
        _read_json(path / "adapter_config.json"), output_dir=str(output_dir),
        plot=(path / LOSS_CURVE_FILE).is_file(), world_size=world_size,
        metrics_plot=(path / METRICS_CURVE_FILE).is_file(),
    )
    tmp = path / (CARD_FILE + ".tmp")
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(path / CARD_FILE)
    return path / CARD_FILE


def write_run_summary(
    output_dir: str | Path, log_history: list[dict[str, Any]], *, world_size: int | None = None
) -> Path:
    """End of a run: the loss-curve PNG (and the task metrics' beside it), then the model card that shows it.

    Args:
        output_dir: The run's ``--output_dir``, after the last save.
        log_history: ``trainer.state.log_history``, which (unlike the saved
            ``trainer_state.json``) includes the evaluation after training.
        world_size: Training processes.

    Returns:
        The card's path.
    """
    run = _read_json(Path(output_dir) / ARGS_FILE)
    base = run.get("args", {}).get("model", {}).get("model_name_or_path") or "?"
    plot_loss_curve(log_history, output_dir, title=f"{Path(output_dir).name} ({base})")
    plot_metric_curves(log_history, output_dir, title=f"{Path(output_dir).name} ({base}): task metrics")
    return write_model_card(output_dir, world_size=world_size)


def write_merged_model_card(output_dir: str | Path, adapter_dir: str | Path) -> Path:
    """Write ``output_dir/README.md`` for a model ``lmtune merge`` wrote: what was merged, the data and
    results of the adapter's training run, and how to load it without peft.

    Returns:
        The card's path.
    """
    path = Path(output_dir)
    run = _read_json(path / ARGS_FILE)
    merged, args = run.get("merged", {}), run.get("args", {})
    base = merged.get("base") or args.get("model", {}).get("model_name_or_path") or "?"
    results = _read_json(Path(adapter_dir) / "all_results.json")
    header = ["---", f"base_model: {base}", "library_name: transformers", "pipeline_tag: text-generation",
              "tags:", "- lmtune", "- merged", "---", ""]
    body = [f"# {path.name}", "",
            f"`{base}` with the {merged.get('peft_type', 'PEFT')} adapter `{merged.get('adapter', adapter_dir)}` "
            f"merged into its weights ({merged.get('dtype', '?')}) by `lmtune merge`: a plain transformers model "
            "whose logits equal those of the base plus the adapter through peft.", ""]
    if args:
        body += ["## Data", "", *_data_lines(args.get("data", {}), results), ""]
    rows = [(key, results[key]) for key in ("train_loss", "eval_loss", "eval_ppl") if key in results]
    if rows:
        body += ["## Results of the adapter's training run", "", *_table(rows, ("metric", "value")), ""]
    body += ["## How to use", "", *_usage_lines(base, str(output_dir), full=True), "",
             f"What was merged, and the training run's arguments, are in `{ARGS_FILE}`."]
    (path / CARD_FILE).write_text("\n".join(header + body) + "\n", encoding="utf-8")
    return path / CARD_FILE


__all__ = ["CARD_FILE", "render_model_card", "write_merged_model_card", "write_model_card", "write_run_summary"]
