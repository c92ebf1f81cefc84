"""Tests for lmtune.evaluate.generation with tiny random models."""


import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from lmtune.errors import ConfigError
from lmtune.evaluate.generation import generate_batched

# These builders are the same in test_evaluate_generation.py and
# test_evaluate_multiple_choice.py; keep them identical. The fixture is called
# tiny_tokenizer so it does not shadow conftest's session-wide `tokenizer`, and the
# tests rely on this exact vocabulary (e.g. " answer" being one token).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Q: What is the answer?\nA: The answer is yes. No, maybe not.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS, with pad/bos/eos = 0/1/2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_llama(vocab_size: int) -> LlamaForCausalLM:
    """The STYLE.md tiny Llama, seeded, fp32, in eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_llama(len(tiny_tokenizer))


PROMPTS = ["Q: What is the answer?\nA:", "def add(a, b):", "The quick brown fox jumps over", "No"]


def reference_greedy(model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, prompt: str, n: int) -> str:
    """Greedy decoding by hand: unpadded, one token at a time, no generate()."""
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tiny_tokenizer.eos_token_id:
                break
    return tiny_tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)


def test_batched_greedy_matches_manual_unpadded_decoding(llama, tiny_tokenizer) -> None:
    outputs = generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert outputs == [reference_greedy(llama, tiny_tokenizer, prompt, 6) for prompt in PROMPTS]
    assert all(not out.startswith(prompt) for out, prompt in zip(outputs, PROMPTS, strict=True))


def test_batch_size_does_not_change_greedy_or_beam_output(llama, tiny_tokenizer) -> None:
    for num_beams in (1, 2):
        one = generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=5, num_beams=num_beams, batch_size=1)
        four = generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=5, num_beams=num_beams, batch_size=4)
        assert one == four


def test_sampling_generation_config_of_model_is_overridden(llama, tiny_tokenizer) -> None:
    greedy = generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    saved = llama.generation_config
    llama.generation_config = saved.__class__(**{**saved.to_dict(), "do_sample": True, "temperature": 5.0, "top_p": 0.9})
    try:
        for _ in range(2):
            assert generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=6) == greedy
        assert llama.generation_config.do_sample is True  # the model's own config is untouched
    finally:
        llama.generation_config = saved


def test_padding_side_and_missing_pad_token_are_restored(llama) -> None:
    tiny_tokenizer = build_tokenizer()
    tiny_tokenizer.pad_token = None
    tiny_tokenizer.padding_side = "right"
    outputs = generate_batched(llama, tiny_tokenizer, PROMPTS[:2], max_new_tokens=3, batch_size=2)
    assert len(outputs) == 2
    assert tiny_tokenizer.pad_token is None
    assert tiny_tokenizer.padding_side == "right"


def test_training_mode_is_restored(llama, tiny_tokenizer) -> None:
    llama.train()
    try:
        generate_batched(llama, tiny_tokenizer, PROMPTS[:1], max_new_tokens=2)
        assert llama.training
    finally:
        llama.eval()


def test_sampling_returns_n_sequences_per_prompt_in_order(llama, tiny_tokenizer) -> None:
    torch.manual_seed(0)
    outputs = generate_batched(
        llama, tiny_tokenizer, PROMPTS[:2], max_new_tokens=4, do_sample=True, temperature=1.0, top_p=1.0,
        num_return_sequences=3, batch_size=1,
    )
    assert len(outputs) == 6


def test_seq2seq_decodes_whole_output(tiny_tokenizer) -> None:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tiny_tokenizer), d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )
    t5 = T5ForConditionalGeneration(config).eval()
    outputs = generate_batched(t5, tiny_tokenizer, PROMPTS, max_new_tokens=5, batch_size=4)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = tiny_tokenizer(prompt, return_tensors="pt")
        expected = t5.generate(**ids, max_new_tokens=5, do_sample=False)
        assert output == tiny_tokenizer.decode(expected[0], skip_special_tokens=True)


def test_empty_prompt_list_returns_empty(llama, tiny_tokenizer) -> None:
    assert generate_batched(llama, tiny_tokenizer, [], max_new_tokens=3) == []


@pytest.mark.parametrize("field", ["max_new_tokens", "batch_size", "num_beams", "num_return_sequences"])
def test_counts_below_one_raise(llama, tiny_tokenizer, field: str) -> None:
    kwargs = {"max_new_tokens": 2, field: 0}
    with pytest.raises(ConfigError, match=f"{field} must be >= 1 \\(got 0\\)"):
        generate_batched(llama, tiny_tokenizer, PROMPTS, **kwargs)


def test_tokenizer_without_pad_or_eos_raises(llama) -> None:
    tiny_tokenizer = build_tokenizer()
    tiny_tokenizer.pad_token = None
    tiny_tokenizer.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad token nor an eos token"):
        generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=2)


def test_bos_adding_tokenizer_decodes_only_the_continuation(llama) -> None:
    # LLaMA-style: every prompt starts with <s>, which must not leak into outputs
    # and must not break the left-padded batch.
    bos_tokenizer = build_tokenizer()
    bos_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tokenizer.bos_token_id)]
    )
    assert bos_tokenizer("No")["input_ids"][0] == bos_tokenizer.bos_token_id
    outputs = generate_batched(llama, bos_tokenizer, PROMPTS, max_new_tokens=5, batch_size=4)
    assert outputs == [reference_greedy(llama, bos_tokenizer, prompt, 5) for prompt in PROMPTS]
    assert not any("<s>" in output for output in outputs)


def test_more_sequences_than_beams_without_sampling_raises(llama, tiny_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"num_return_sequences \(2\) must be <= num_beams \(1\)"):
        generate_batched(llama, tiny_tokenizer, PROMPTS, max_new_tokens=2, num_return_sequences=2)
