"""Tokenizer metadata for a GGUF file: a transformers ``tokenizer.json`` in llama.cpp's key names.

llama.cpp does not run ``tokenizer.json``: it re-implements two tokenizer kinds and needs
the vocabulary laid out for them under ``tokenizer.ggml.*``:

- ``llama`` (SentencePiece BPE with byte fallback, the LLaMA/Mistral tokenizer): tokens,
  one score a token (merge priority: higher merges first) and token types (byte tokens
  ``<0xNN>``, control, unknown);
- ``gpt2`` (byte-level BPE, GPT-2 style, SmolLM2's): tokens, merges, token types, and a
  pre-tokenizer name (``tokenizer.ggml.pre``) that selects the regex llama.cpp splits text
  with before merging.

Special token ids, ``add_bos``/``add_eos`` and the chat template go through the ``gguf``
package's ``SpecialVocab``. Transformers 5 saves no ``tokenizer.model``, so the LLaMA
scores are derived from ``tokenizer.json``'s merge ranks (the order SentencePiece's own
scores encode) instead of read from the SentencePiece file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType
from transformers import AutoTokenizer

from lmtune.errors import UnsupportedError

# llama.cpp's names for the pre-tokenizers whose tokenizer.json shape we recognise.
# "smollm" is llama.cpp's name for "split every digit, then GPT-2's regex" (also StarCoder's).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with its GPT-2 regex",
    "smollm": "Digits(individual_digits) then ByteLevel with its GPT-2 regex",
    "llama-bpe": "Split(LLaMA-3 regex) then ByteLevel without regex",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    """The tokenizer as llama.cpp reads it."""

    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str | None  # tokenizer.ggml.pre (gpt2 only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # llama only
    add_space_prefix: bool


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level tokenizer.json pre-tokenizer, or None when unknown."""
    steps = _steps(pre, "pretokenizers")
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT \
            and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None


def _tokenizer_kind(data: dict, file: Path) -> tuple[str, str | None]:
    """("llama", None) or ("gpt2", pre-tokenizer name) for a tokenizer.json.

    Raises:
        UnsupportedError: for any other tokenizer model or pre-tokenizer.
    """
    model, decoder = data.get("model", {}), data.get("decoder") or {}
    pre = data.get("pre_tokenizer") or {}
    supported = ("supported: SentencePiece-style BPE with byte fallback (LLaMA, Mistral) and byte-level "
                 f"BPE with one of these pre-tokenizers: {'; '.join(PRE_TOKENIZERS.values())}")
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{file}: a {model.get('type')} tokenizer is not supported for GGUF export ({supported}).")
    if model.get("byte_fallback"):
        return "llama", None
    if decoder.get("type") != "ByteLevel":
        raise UnsupportedError(f"{file}: a BPE tokenizer without byte fallback or byte-level decoding is not "
                               f"supported for GGUF export ({supported}).")
    name = _pre_tokenizer_name(pre)
    if name is None:
        raise UnsupportedError(f"{file}: the pre-tokenizer {json.dumps(pre)} has no llama.cpp equivalent that "
                               f"lmtune knows, so llama.cpp would split text differently ({supported}).")
    return "gpt2", name


def check_tokenizer(tokenizer, source: str) -> None:
    """Raise before any long work unless llama.cpp has an equivalent of this loaded tokenizer.

    Raises:
        UnsupportedError: a slow (Python) tokenizer, or one ``read_vocab`` would refuse.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedError(f"{source}: a {type(tokenizer).__name__} (no tokenizers backend) is not supported "
                               "for GGUF export; it needs a fast tokenizer (tokenizer.json).")
    _tokenizer_kind(json.loads(backend.to_str()), Path(source, "tokenizer.json"))


def _merge_ranks(merges: list) -> dict[str, int]:
    """The rank of the merge that first produces each token (merges are "a b" strings or [a, b] pairs)."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def read_vocab(tokenizer_dir: Path, n_vocab: int) -> GgufVocab:
    """The vocabulary of ``tokenizer_dir/tokenizer.json`` laid out for llama.cpp, padded to ``n_vocab``.

    Embedding rows past the tokenizer (a vocabulary rounded up to a multiple of 64, say)
    get placeholder tokens ``[PADn]`` of type UNUSED, as llama.cpp's converter writes them.

    Raises:
        UnsupportedError: a tokenizer llama.cpp has no equivalent of, or one with more
            tokens than the model has embedding rows.
    """
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        raise UnsupportedError(f"{tokenizer_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer.")
    data = json.loads(file.read_text(encoding="utf-8"))
    kind, pre = _tokenizer_kind(data, file)
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise UnsupportedError(f"{file}: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} "
                               "embedding rows; merge or resize the embeddings first.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for i, token in added.items():
        types[i] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
    scores = _sentencepiece_scores(data, vocab, types) if kind == "llama" else None
    return GgufVocab(kind, pre, tokens, types, scores, kind == "llama" and _adds_space_prefix(data))


def _sentencepiece_scores(data: dict, vocab: dict[str, int], types: list[int]) -> list[float]:
    """Scores for llama.cpp's SentencePiece tokenizer; marks byte and unknown tokens in ``types`` too."""
    ranks = _merge_ranks(data["model"].get("merges", []))
    scores = [0.0] * len(types)
    for text, i in vocab.items():
        if _BYTE_TOKEN.fullmatch(text):
            types[i] = int(TokenType.BYTE)
        elif types[i] == TokenType.NORMAL:
            # SentencePiece merges the pair whose product scores highest: earlier merges score higher.
            scores[i] = -float(ranks.get(text, len(ranks) + i))
    unk = vocab.get(data["model"].get("unk_token") or "")
    if unk is not None:
        types[unk] = int(TokenType.UNKNOWN)
    return scores


def _steps(component: dict | None, key: str) -> list[dict]:
    if not component:
        return []
    return component.get(key, []) if component.get("type") == "Sequence" else [component]


def _adds_space_prefix(data: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (SentencePiece's add_dummy_prefix)."""
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    return any(step.get("type") == "Prepend" for step in _steps(data.get("normalizer"), "normalizers"))


def _added_specials(tokenizer_dir: Path) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, read from the tokenizer's behaviour rather than its files."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("a").input_ids
    return {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]}


def add_vocab(writer: GGUFWriter, tokenizer_dir: Path, n_vocab: int) -> GgufVocab:
    """Write the tokenizer of ``tokenizer_dir`` into ``writer``: vocabulary, specials, chat template.

    Raises:
        UnsupportedError: see ``read_vocab``.
    """
    vocab = read_vocab(tokenizer_dir, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    # SpecialVocab also guesses add_bos/add_eos from the post-processor, warning about shapes it
    # does not know (our demo tokenizer's BOS-separated pairs); we replace that guess, so quiet it.
    vocab_logger = logging.getLogger("gguf.vocab")
    level = vocab_logger.level
    vocab_logger.setLevel(logging.ERROR)
    try:
        special = SpecialVocab(tokenizer_dir, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    finally:
        vocab_logger.setLevel(level)
    special.add_special_token = _added_specials(tokenizer_dir)
    special.add_to_gguf(writer, quiet=True)
    return vocab
