"""Log-likelihood scoring for encoder-decoder models (T5, FLAN-T5), as lm-evaluation-harness's seq2seq backend.

Stage contract: the counterpart of ``multiple_choice.loglikelihoods`` (causal LMs only) for
seq2seq models: ``(context, continuation)`` pairs in, summed continuation log-probabilities out.
As lm-eval 0.4 does for ``AutoModelForSeq2SeqLM``: trailing spaces of the context move to the
continuation; the context is the encoder input, tokenized with the tokenizer's special tokens
(T5's ``</s>``); the continuation, without special tokens, is the decoder's labels; its
log-probability is read from the decoder logits (teacher forcing from ``decoder_start_token_id``).

``score_truthfulqa_seq2seq`` is ``multiple_choice.score_truthfulqa`` over these log-likelihoods:
the same prompt, the same deduplicated requests and the same MC1/MC2 formulas.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.errors import ConfigError, DataFormatError
from lmtune.evaluate.batched_scoring import EncodedPair, scores_in_batches
from lmtune.evaluate.multiple_choice import MCQuestion, truthfulqa_scores


def encode_seq2seq_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
                        ) -> EncodedPair:
    """Encoder ids of the context and label ids of the continuation, split as lm-eval splits them.

    Raises:
        DataFormatError: if the continuation encodes to no tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer(context).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    if not continuation_ids:
        raise DataFormatError(f"continuation {continuation!r:.60} encodes to no tokens; it cannot be scored")
    return context_ids, continuation_ids


def _score_batch(model: PreTrainedModel, pairs: list[EncodedPair], pad_id: int) -> list[float]:
    width = max(len(ctx) for ctx, _ in pairs)
    label_width = max(len(cont) for _, cont in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(pairs), label_width), -100, dtype=torch.long)
    for row, (ctx, cont) in enumerate(pairs):
        input_ids[row, : len(ctx)] = torch.tensor(ctx)
        attention_mask[row, : len(ctx)] = 1
        labels[row, : len(cont)] = torch.tensor(cont)
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   labels=labels.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).to(device).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100).to(device)).sum(dim=-1).tolist()


def seq2seq_loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Summed log-probability of each continuation given its context, for an encoder-decoder model.

    Raises:
        ConfigError: if ``batch_size`` < 1 or the model is not an encoder-decoder.
        DataFormatError: if a continuation is empty.
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is not an encoder-decoder model; use multiple_choice.loglikelihoods")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return scores_in_batches(
        model, requests, lambda context, continuation: encode_seq2seq_pair(tokenizer, context, continuation),
        lambda pairs: _score_batch(model, pairs, pad_id), batch_size=batch_size, length=lambda pair: len(pair[0]),
    )


def score_truthfulqa_seq2seq(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    *,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, float]:
    """TruthfulQA MC1/MC2 of an encoder-decoder model (see ``multiple_choice.score_truthfulqa``).

    Raises:
        ConfigError: if ``limit`` < 1.
        DataFormatError: if there are no questions to score.
    """
    return truthfulqa_scores(
        questions, lambda requests: seq2seq_loglikelihoods(model, tokenizer, requests, batch_size=batch_size),
        limit=limit,
    )
