"""A tiny random T5 (FLAN-T5's architecture) and a T5-like tokenizer, built locally for tests.

The tokenizer is a byte-level BPE trained on lmtune's demo texts and wrapped as
``PreTrainedTokenizerFast`` with T5's special-token layout: ``<pad>`` = 0 (also the decoder
start), ``</s>`` = 1 appended to every encoded text, ``<unk>`` = 2. The model is a seeded
fp32 ``T5ForConditionalGeneration`` from a ``T5Config`` small enough for a CPU test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from lmtune.demo import load_demo_records

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def build_t5_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """T5's special tokens and trailing ``</s>``, on a byte-level BPE (no unknown characters)."""
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in load_demo_records()]
    texts.append("Summarize the highlights of this article.\n### User:\n### Assistant:\n### System:\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def save_tiny_t5(path: Path) -> Path:
    """Write the tiny T5 and its tokenizer to ``path``, as a hub checkpoint would be laid out."""
    tokenizer = build_t5_tokenizer()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
