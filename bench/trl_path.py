"""TRL's ``SFTTrainer`` on the benchmark's records: the peer a CPU user would most likely pick.

Same records, model, LoRA (r=8, alpha 16, dropout 0.05 on q_proj/v_proj), ``max_length`` =
the benchmark's sequence length, batch, learning rate 1e-4 and one epoch as every other
variant. Everything else is TRL's default, so the runs show what TRL does out of the box:

- the Alpaca prompt and the output as a prompt-completion dataset, so TRL's default
  ``completion_only_loss`` trains on the response only (as the reference and lmtune do);
- ``SFTConfig`` defaults: ``bf16=True`` (autocast; on a CPU without bf16 units TRL emulates it,
  so the benchmark passes the variant's ``bf16``), ``gradient_checkpointing=True``;
- ``packed``: ``packing=True`` with TRL's default best-fit-decreasing strategy, which makes
  batches padding-free (one row of concatenated samples, each attending only to itself via
  ``position_ids``), and gradient checkpointing off (what a user after speed would choose).

Nothing from lmtune is imported: this file stands for the other program.
"""

from __future__ import annotations

import json

import datasets
import transformers
from peft import LoraConfig
from transformers import AutoTokenizer

from bench.reference_path import alpaca_source


def prompt_completion_records(train_file: str) -> datasets.Dataset:
    """The Alpaca records as TRL's prompt-completion format (the reference's prompt text)."""
    with open(train_file, encoding="utf-8") as handle:
        records = json.load(handle)
    return datasets.Dataset.from_list(
        [{"prompt": alpaca_source(r), "completion": r["output"]} for r in records]
    )


def run_trl(
    *,
    model_dir: str,
    train_file: str,
    output_dir: str,
    max_seq_length: int,
    batch_size: int,
    bf16: bool,
    packed: bool,
    seed: int = 42,
) -> dict:
    """Train one epoch with ``SFTTrainer``; returns the same fields as ``run_reference``."""
    from trl import SFTConfig, SFTTrainer

    transformers.set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    speed = dict(packing=True, gradient_checkpointing=False) if packed else {}
    config = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=1e-4,
        max_length=max_seq_length, bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to=[], seed=seed, disable_tqdm=True, optim="adamw_torch", **speed,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_dir, args=config, train_dataset=prompt_completion_records(train_file),
                         processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    dataset = trainer.train_dataset
    # Tokens trained on: every non-pad position of the prepared rows (TRL's packing drops none).
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    return {
        "train_loss": result.metrics["train_loss"],
        "final_loss": losses[-1] if losses else float("nan"),
        "dataset_tokens": tokens,
        "steps": trainer.state.global_step,
    }
