"""Batched text generation shared by the ROUGE and HumanEval evaluators.

Stage contract: prompts (plain strings) in, generated continuations (plain
strings, special tokens removed) out, in the order of the prompts. Causal LMs
return only the new tokens; seq2seq models (T5) return their whole decoder
output, which never contains the prompt.

It fixes two reference bugs (reference-internals §9.4): generation ran at batch
size 1, and it inherited ``do_sample=True`` from Llama-2's ``generation_config``,
which turned "beam search" into random beam sampling. Here every sampling knob
is set explicitly, so ``do_sample=False`` always means deterministic.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lmtune.progress_lines import tracked
from lmtune.errors import ConfigError

# Knobs that only matter when sampling; transformers v5 rejects them when
# do_sample=False, and a model's generation_config.json often sets them.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


@contextmanager
def generation_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[PreTrainedTokenizerBase]:
    """Temporarily left-pad, with eos as pad when the tokenizer has no pad token.

    Decoder-only models must see prompts right-aligned so new tokens follow
    each prompt directly. The tokenizer's own settings come back afterwards,
    even on error, so the training collator is unaffected.

    Args:
        tokenizer: The tokenizer to adjust in place for the duration.

    Yields:
        The same tokenizer.

    Raises:
        ConfigError: If the tokenizer has neither a pad nor an eos token.
    """
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "cannot batch prompts: the tokenizer has neither a pad token nor an eos token. "
                "Set tokenizer.pad_token before evaluating."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old_side
        tokenizer.pad_token = old_pad


def build_generation_config(
    model: PreTrainedModel,
    pad_token_id: int,
    *,
    max_new_tokens: int,
    num_beams: int,
    do_sample: bool,
    temperature: float | None,
    top_p: float | None,
    num_return_sequences: int,
) -> GenerationConfig:
    """Copy the model's generation config and set every decoding knob explicitly.

    Args:
        model: Model whose ``generation_config`` supplies eos/bos/decoder-start ids.
        pad_token_id: Id used to pad finished sequences.
        max_new_tokens: Upper bound on generated tokens per sequence.
        num_beams: Beam width; 1 is greedy (or plain sampling).
        do_sample: Sample instead of taking the arg-max.
        temperature: Sampling temperature; ignored unless ``do_sample``.
        top_p: Nucleus sampling mass; ignored unless ``do_sample``.
        num_return_sequences: Sequences returned per prompt.

    Returns:
        A ``GenerationConfig`` independent of the model's own.
    """
    config = copy.deepcopy(model.generation_config)
    for name in _SAMPLING_FIELDS:
        setattr(config, name, None)
    config.do_sample = do_sample
    if do_sample:
        config.temperature = temperature
        config.top_p = top_p
    config.num_beams = num_beams
    config.num_return_sequences = num_return_sequences
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_token_id
    return config


def decode_continuation(tokenizer: PreTrainedTokenizerBase, token_ids: torch.Tensor, prompt_length: int) -> str:
    """Decode the tokens after ``prompt_length`` as they read after the prompt.

    SentencePiece tokenizers (Llama, Mistral) drop the leading space of the
    first token when it is decoded alone, so ``"    return x"`` after a prompt
    would come back with three spaces of indentation. Decoding prompt and
    continuation together and removing the decoded prompt keeps it exact, as
    bigcode-evaluation-harness does.

    Args:
        tokenizer: The tokenizer that produced ``token_ids``.
        token_ids: One generated row: (padded) prompt tokens, then new tokens.
        prompt_length: Number of leading prompt (and padding) tokens.

    Returns:
        The new text, special tokens removed.
    """
    prompt_text = tokenizer.decode(token_ids[:prompt_length], skip_special_tokens=True)
    full_text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text) :]
    # Decoding is not prefix-stable for this tokenizer; fall back to the new tokens alone.
    return tokenizer.decode(token_ids[prompt_length:], skip_special_tokens=True)


def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    num_return_sequences: int = 1,
) -> list[str]:
    """Generate continuations for many prompts, a batch at a time.

    Prompts are tokenized with the tokenizer's special tokens (BOS for Llama,
    the trailing ``</s>`` a T5 encoder expects), sorted by length so batches
    carry little padding, and returned in the original order.

    Args:
        model: A causal LM or an encoder-decoder (seq2seq) model.
        tokenizer: Its tokenizer; padding side and pad token are restored afterwards.
        prompts: Input texts.
        max_new_tokens: Upper bound on generated tokens per sequence.
        num_beams: Beam width (1 = greedy when not sampling).
        batch_size: Prompts per ``generate`` call.
        do_sample: Sample; the default ``False`` is deterministic greedy/beam search
            regardless of the model's ``generation_config``.
        temperature: Sampling temperature, used only when ``do_sample``.
        top_p: Nucleus sampling mass, used only when ``do_sample``.
        num_return_sequences: Outputs per prompt; must be <= ``num_beams`` unless sampling.

    Returns:
        ``len(prompts) * num_return_sequences`` strings: the outputs of prompt 0,
        then those of prompt 1, and so on, decoded without special tokens.

    Raises:
        ConfigError: If a count is < 1, ``num_return_sequences`` exceeds ``num_beams``
            without sampling, or the tokenizer has no pad or eos token.
    """
    _check_counts(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                  num_return_sequences=num_return_sequences, do_sample=do_sample)
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        with generation_padding(tokenizer), torch.inference_mode():
            config = build_generation_config(
                model, tokenizer.pad_token_id, max_new_tokens=max_new_tokens, num_beams=num_beams,
                do_sample=do_sample, temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
            )
            return _generate_longest_first(model, tokenizer, prompts, config, batch_size)
    finally:
        model.train(was_training)


def _check_counts(*, max_new_tokens: int, num_beams: int, batch_size: int, num_return_sequences: int,
                  do_sample: bool) -> None:
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("num_beams", num_beams),
        ("batch_size", batch_size),
        ("num_return_sequences", num_return_sequences),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1 (got {value})")
    if not do_sample and num_return_sequences > num_beams:
        raise ConfigError(
            f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}) without "
            "sampling: greedy and beam search return at most one sequence per beam. Raise num_beams or set do_sample."
        )


def _generate_longest_first(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config, batch_size: int
) -> list[str]:
    """Batches of similar length (little padding), outputs returned in the prompts' order."""
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    per_prompt = config.num_return_sequences or 1
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[list[str]] = [[] for _ in prompts]
    for start in tracked(range(0, len(order), batch_size), -(-len(order) // batch_size), "generating"):
        indices = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(**batch, generation_config=config)
        if is_seq2seq:
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        else:
            # Left padding aligns every prompt to end at the same column.
            prompt_length = batch["input_ids"].shape[1]
            texts = [decode_continuation(tokenizer, row, prompt_length) for row in generated]
        for row, index in enumerate(indices):
            outputs[index] = texts[row * per_prompt : (row + 1) * per_prompt]
    return [text for group in outputs for text in group]
