"""Which prompt ``lmtune chat`` gives the model: the chat format, or the completion prompt it was trained on.

Contract: ``resolve_prompt_format`` turns ``--prompt_format`` and the ``--task`` recorded in the
run's ``lmtune_args.json`` into ``chat`` or ``completion``. A model trained with ``--task
completion`` or ``code-generation`` learned from instruction records rendered as the Alpaca
prompt, one record at a time, never from a conversation; ``completion_prompt_ids`` therefore
wraps each message, alone, as the instruction of the no-input Alpaca prompt, built by the
training code itself: ``lmtune.data.formats.alpaca_prompt`` (``seq2seq_alpaca_prompt`` for
encoder-decoder models) tokenized by ``lmtune.data.render.render_examples``, so the ids are
token for token the prompt part of a training sample.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lmtune.data.formats import alpaca_prompt
from lmtune.data.render import render_examples
from lmtune.data.seq2seq import seq2seq_alpaca_prompt
from lmtune.errors import DataFormatError

AUTO, CHAT, COMPLETION = "auto", "chat", "completion"
# The tasks lmtune.data.prepare renders with render_instructions: instruction records -> Alpaca prompt.
INSTRUCTION_TASKS = ("completion", "code-generation")
# Rendering a prompt alone must never hit training's length limit; the prompt budget is checked here.
_NO_LIMIT = 1 << 62


def resolve_prompt_format(requested: str, trained_task: str | None) -> str:
    """``chat`` or ``completion``: ``requested`` unless it is ``auto``, then what the training task implies.

    Args:
        requested: ``--prompt_format``: ``auto``, ``chat`` or ``completion``.
        trained_task: The ``--task`` the model was fine-tuned with (None: not an lmtune run).

    Returns:
        ``completion`` for an ``auto`` model trained on instruction prompts, else ``chat``.
    """
    if requested != AUTO:
        return requested
    return COMPLETION if trained_task in INSTRUCTION_TASKS else CHAT


def completion_prompt(message: str, *, seq2seq: bool) -> str:
    """The Alpaca prompt (no-input variant) with ``message`` as the instruction, as training writes it.

    Causal models train on the prompt ending in ``### Response:\\n``; seq2seq models on the
    reference's seq2seq variant, over the stripped instruction and without the final newline.
    """
    return seq2seq_alpaca_prompt(message) if seq2seq else alpaca_prompt(message)


def completion_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, message: str, *, seq2seq: bool, max_prompt_tokens: int | None = None
) -> list[int]:
    """Token ids of ``completion_prompt(message)`` exactly as training tokenizes a sample's prompt.

    A causal prompt is rendered as a training sample with an empty response, whose final EOS
    (the supervised end of the response) is then removed; a seq2seq prompt is tokenized with
    the tokenizer's special tokens (T5's ``</s>``), as the encoder input of a training sample.

    Args:
        tokenizer: The tokenizer the model was trained with.
        message: The user's message: the instruction.
        seq2seq: The model is an encoder-decoder model.
        max_prompt_tokens: Refuse prompts longer than this.

    Raises:
        DataFormatError: if the prompt is longer than ``max_prompt_tokens``, or the tokenizer has no EOS.
    """
    text = completion_prompt(message, seq2seq=seq2seq)
    if seq2seq:
        ids = tokenizer(text).input_ids
    else:
        samples, _ = render_examples(tokenizer, [{"prompt": text, "response": ""}], max_seq_length=_NO_LIMIT)
        ids = samples["input_ids"][0][:-1]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise DataFormatError(
            f"chat: the message makes a {len(ids)}-token completion prompt, more than the {max_prompt_tokens} "
            "allowed (--max_prompt_tokens); shorten it."
        )
    return ids
