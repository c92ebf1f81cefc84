"""A faithful re-creation of the reference's CPU fast path (ITREX NeuralChat ``finetune_clm.py``).

This is what ``finetune_clm.py --bf16 True [--dataset_concatenation] --peft lora --no_cuda`` does
on an Alpaca file, written against today's transformers/peft (see
``../shared/seed/reference-internals.md`` sections 3.1, 4, 5, 6, 8.2):

- Alpaca prompt (ROBIN template, ``### Response:\\n``), ``source + target`` tokenized as one text
  with BOS, EOS appended unless truncated, ``labels[:len(tokenize(source))] = -100``;
- ``--dataset_concatenation``: every column flattened and cut into ``max_seq_length`` chunks,
  tail dropped, attention mask all ones (samples attend to each other), positions run on;
- LLaMA special-token override: pad id 0 (``<unk>``), and left padding for training batches;
- model loaded in bf16, LoRA r=8/alpha 16/dropout 0.05 on q_proj/v_proj, then the WHOLE PEFT model
  cast to bf16 (no fp32 adapter copy);
- ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``, stock ``Trainer`` (bf16 -> CPU autocast),
  the AdamW of the reference's era (``adamw_torch``), lr 1e-4.

Nothing from lmtune is imported: this file stands for the other program.
"""

from __future__ import annotations

import json
from itertools import chain

import datasets
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

IGNORE_INDEX = -100
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_source(record: dict) -> str:
    """The reference's completion prompt for one Alpaca record."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def make_preprocess(tokenizer, max_seq_length: int):
    """The reference's batched ``preprocess_function`` for the completion task (train_on_inputs=False)."""

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        records = [dict(zip(examples, values)) for values in zip(*examples.values())]
        sources = [alpaca_source(r) for r in records]
        texts = [s + r["output"] for s, r in zip(sources, records)]
        full = tokenizer(texts, truncation=True, max_length=max_seq_length, padding=False)
        alone = tokenizer(sources, truncation=True, max_length=max_seq_length, padding=False)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, mask, source_ids in zip(full["input_ids"], full["attention_mask"], alone["input_ids"]):
            ids, mask = list(ids), list(mask)
            if ids[-1] != tokenizer.eos_token_id and len(ids) < max_seq_length:
                ids.append(tokenizer.eos_token_id)
                mask.append(1)
            labels = list(ids)
            labels[: len(source_ids)] = [IGNORE_INDEX] * len(source_ids)
            out["input_ids"].append(ids)
            out["attention_mask"].append(mask)
            out["labels"].append(labels)
        return out

    return preprocess


def concatenate_data(dataset: datasets.Dataset, max_seq_length: int) -> datasets.Dataset:
    """``--dataset_concatenation``: flatten every column, cut into fixed chunks, drop the tail."""
    concatenated = {column: list(chain(*dataset[column])) for column in dataset.column_names}
    total = (len(concatenated["input_ids"]) // max_seq_length) * max_seq_length
    chunks = {
        column: [values[i : i + max_seq_length] for i in range(0, total, max_seq_length)]
        for column, values in concatenated.items()
    }
    return datasets.Dataset.from_dict(chunks)


def load_reference_tokenizer(model_dir: str):
    """Tokenizer as the reference leaves it: LLaMA ids forced to pad 0 / bos 1 / eos 2, left padding."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id = 0, 1, 2
    tokenizer.padding_side = "left"
    return tokenizer


def prepare_reference_data(tokenizer, train_file: str, max_seq_length: int, concatenation: bool):
    """Tokenized (and optionally concatenated) train set, plus the count of tokens it trains on."""
    with open(train_file, encoding="utf-8") as handle:
        records = json.load(handle)
    raw = datasets.Dataset.from_list(records)
    tokenized = raw.map(make_preprocess(tokenizer, max_seq_length), batched=True, remove_columns=raw.column_names)
    if concatenation:
        tokenized = concatenate_data(tokenized, max_seq_length)
    dataset_tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return tokenized, dataset_tokens


def build_reference_model(model_dir: str, dtype: torch.dtype):
    """bf16 load, LoRA on q_proj/v_proj, then the whole PEFT model cast to the same dtype."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, low_cpu_mem_usage=True)
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = 0, 1
    model.generation_config.eos_token_id = 2
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    if dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)
    return model


def run_reference(
    *,
    model_dir: str,
    train_file: str,
    output_dir: str,
    max_seq_length: int,
    batch_size: int,
    concatenation: bool,
    bf16: bool,
    seed: int = 42,
) -> dict:
    """Train one epoch the reference's way.

    Returns:
        ``train_loss`` (epoch mean), ``final_loss`` (last logged step), ``dataset_tokens``, ``steps``.
    """
    transformers.set_seed(seed)
    tokenizer = load_reference_tokenizer(model_dir)
    train, dataset_tokens = prepare_reference_data(tokenizer, train_file, max_seq_length, concatenation)
    model = build_reference_model(model_dir, torch.bfloat16 if bf16 else torch.float32)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=1e-4,
        bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], optim="adamw_torch",
        seed=seed, disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "train_loss": result.metrics["train_loss"],
        "final_loss": losses[-1] if losses else float("nan"),
        "dataset_tokens": dataset_tokens,
        "steps": trainer.state.global_step,
    }
