"""llama2.c checkpoint + tokenizer -> a transformers ``LlamaForCausalLM`` directory.

llama2.c (karpathy) stores tiny pretrained LLaMA-2-architecture models as raw float32
files and their SentencePiece vocabularies in its own ``tokenizer.bin`` format. This
module reads both and writes an ordinary transformers model directory (safetensors,
config, generation config) with a fast tokenizer that encodes and decodes the way
llama2.c's ``run.c`` does, so the result trains, merges and chats like any hub model.

Checkpoint formats read:
- version 0 (legacy ``export.py --version 0``): 7 int32 header ``dim, hidden_dim,
  n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a positive ``vocab_size`` means
  the classifier shares the embedding), then the weights grouped by kind over layers;
- version 1 (``ak42`` magic, 256-byte header, float32).
Version 2 (int8 groups) is refused with the way out.

RoPE: llama2.c rotates adjacent pairs ``(2i, 2i+1)`` of each head, transformers rotates
``(i, i + d/2)``; the q and k projections are permuted as transformers'
``convert_llama_weights_to_hf`` does, which makes the two computations identical.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from lmtune.errors import ConfigError

logger = logging.getLogger(__name__)

MAGIC_V1 = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
BYTE_PIECES = 256  # ids 3..258: <0x00> .. <0xFF> byte fallback


@dataclass(frozen=True)
class Llama2cHeader:
    """The shape of a llama2.c model, as its header states it."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int
    weights_offset: int

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads


def read_header(data: bytes, source: str) -> Llama2cHeader:
    """Parse the header of a version 0 or version 1 checkpoint.

    Raises:
        ConfigError: for a file too short, an int8 (version 2) file or an impossible shape.
    """
    if len(data) < 28:
        raise ConfigError(f"{source}: {len(data)} bytes is too short for a llama2.c checkpoint.")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MAGIC_V1:
        (version,) = struct.unpack_from("<i", data, 4)
        if version != 1:
            raise ConfigError(
                f"{source}: llama2.c checkpoint version {version} is not supported (allowed: 0 and 1, float32). "
                "Re-export it with llama2.c's `export.py --version 1` or `--version 0`."
            )
        fields = struct.unpack_from("<7i", data, 8)
        (shared,) = struct.unpack_from("<B", data, 36)
        header = Llama2cHeader(*fields[:5], vocab_size=fields[5], seq_len=fields[6],
                               shared_classifier=bool(shared), version=1, weights_offset=V1_HEADER_BYTES)
    else:
        fields = struct.unpack_from("<7i", data, 0)
        header = Llama2cHeader(*fields[:5], vocab_size=abs(fields[5]), seq_len=fields[6],
                               shared_classifier=fields[5] > 0, version=0, weights_offset=28)
    sizes = (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads,
             header.vocab_size, header.seq_len)
    if min(sizes) <= 0 or header.dim % header.n_heads or header.n_heads % header.n_kv_heads:
        raise ConfigError(f"{source}: header {sizes} does not describe a llama2.c model; is this a checkpoint?")
    return header


def _tensor_plan(h: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in file order; ``{i}`` names repeat per layer."""
    kv_dim = h.n_kv_heads * h.head_size
    per_layer = {
        "attention_norm": (h.dim,), "wq": (h.dim, h.dim), "wk": (kv_dim, h.dim), "wv": (kv_dim, h.dim),
        "wo": (h.dim, h.dim), "ffn_norm": (h.dim,), "w1": (h.hidden_dim, h.dim), "w2": (h.dim, h.hidden_dim),
        "w3": (h.hidden_dim, h.dim),
    }
    freqs = [("freqs_cos", (h.seq_len, h.head_size // 2)), ("freqs_sin", (h.seq_len, h.head_size // 2))]
    if h.version == 0:
        order = ["tok_embeddings"] + list(per_layer) + ["norm"] + ["freqs"]
    else:
        order = ["attention_norm", "ffn_norm", "norm", "tok_embeddings",
                 "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    plan: list[tuple[str, tuple[int, ...]]] = []
    for kind in order:
        if kind == "tok_embeddings":
            plan.append((kind, (h.vocab_size, h.dim)))
        elif kind == "norm":
            plan.append((kind, (h.dim,)))
        elif kind == "freqs":
            plan += freqs
        else:
            plan += [(f"{kind}.{i}", per_layer[kind]) for i in range(h.n_layers)]
    if not h.shared_classifier:
        plan.append(("output", (h.vocab_size, h.dim)))
    return plan


def read_checkpoint(path: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a llama2.c float32 checkpoint into llama2.c-named tensors.

    Raises:
        ConfigError: when the file is missing, or its size does not match its header.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"llama2.c checkpoint {path}: no such file.")
    data = file.read_bytes()
    header = read_header(data, str(path))
    plan = _tensor_plan(header)
    floats = sum(int(np.prod(shape)) for _, shape in plan)
    expected = header.weights_offset + 4 * floats
    if len(data) != expected:
        raise ConfigError(
            f"{path}: {len(data)} bytes, but its header {tuple(header.__dict__.values())[:7]} needs {expected} "
            "(float32 weights); the file is truncated or not a llama2.c checkpoint."
        )
    values = np.frombuffer(data, dtype="<f4", count=floats, offset=header.weights_offset)
    tensors: dict[str, torch.Tensor] = {}
    at = 0
    for name, shape in plan:
        n = int(np.prod(shape))
        tensors[name] = torch.from_numpy(values[at : at + n].copy()).reshape(shape)
        at += n
    return header, tensors


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q/k projection from llama2.c's interleaved RoPE pairs to transformers' halves."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_transformers(header: Llama2cHeader, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Build the transformers model holding the checkpoint's weights."""
    config = LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=header.shared_classifier,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, dtype="float32",
    )
    state = {"model.embed_tokens.weight": tensors["tok_embeddings"], "model.norm.weight": tensors["norm"]}
    names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i in range(header.n_layers):
        for ours, theirs in names.items():
            weight = tensors[f"{ours}.{i}"]
            if ours == "wq":
                weight = _permute_rotary(weight, header.n_heads)
            elif ours == "wk":
                weight = _permute_rotary(weight, header.n_kv_heads)
            state[f"model.layers.{i}.{theirs}.weight"] = weight
    state["lm_head.weight"] = tensors["tok_embeddings" if header.shared_classifier else "output"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    # Buffers (RoPE inverse frequencies) were created on meta: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def read_tokenizer(path: str | Path, vocab_size: int) -> list[tuple[str, float]]:
    """The (piece, score) list of a llama2.c ``tokenizer.bin``, pieces in SentencePiece spelling.

    Raises:
        ConfigError: when the file is missing, truncated, or its size disagrees with the model.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"llama2.c tokenizer {path}: no such file.")
    data = file.read_bytes()
    pieces: list[tuple[str, float]] = []
    at = 4  # int32 max_token_length, not needed
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, at)
            raw = data[at + 8 : at + 8 + length]
            if len(raw) != length:
                raise struct.error("short read")
            pieces.append((raw.decode("utf-8"), score))
            at += 8 + length
    except (struct.error, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path}: cannot read {vocab_size} tokens ({err}); is it the tokenizer.bin made for this checkpoint?"
        ) from err
    if at != len(data):
        raise ConfigError(f"{path}: holds more than the model's {vocab_size} tokens; pair it with its own checkpoint.")
    # llama2.c writes BOS/EOS as "\n<s>\n"/"\n</s>\n" and SentencePiece's "▁" as a space.
    named = list(SPECIAL_PIECES) + [p.replace(" ", "▁") for p, _ in pieces[len(SPECIAL_PIECES):]]
    return [(name, score) for name, (_, score) in zip(named, pieces)]


def bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges: every split of a piece into two pieces, best merged score first.

    llama2.c encodes by repeatedly merging the adjacent pair whose merged piece scores
    highest; a BPE whose merge ranks follow those scores makes the same choices.
    """
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    first_merged = len(SPECIAL_PIECES) + BYTE_PIECES
    candidates = []
    for piece, score in pieces[first_merged:]:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                candidates.append((-score, ids[left], ids[right], left, right))
    candidates.sort()
    return [(left, right) for _, _, _, left, right in candidates]


def build_tokenizer(pieces: list[tuple[str, float]], model_max_length: int) -> LlamaTokenizer:
    """A fast LLaMA tokenizer (BOS added, byte fallback) with llama2.c's vocabulary and merge order."""
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=bpe_merges(pieces), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=model_max_length,
    )
    return tokenizer


def convert_llama2c(checkpoint: str | Path, tokenizer: str | Path, output_dir: str | Path,
                    *, overwrite: bool = False) -> Path:
    """Convert a llama2.c checkpoint and its tokenizer into a transformers model directory.

    Args:
        checkpoint: The ``.bin`` model file (version 0 or 1, float32).
        tokenizer: The matching llama2.c ``tokenizer.bin`` (e.g. ``tok512.bin``).
        output_dir: Where to write; must be empty or absent unless ``overwrite``.
        overwrite: Write into a non-empty directory.

    Returns:
        The output directory.

    Raises:
        ConfigError: for unreadable inputs or a non-empty output directory.
    """
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty; choose a new one or pass --overwrite_output_dir.")
    header, tensors = read_checkpoint(checkpoint)
    pieces = read_tokenizer(tokenizer, header.vocab_size)
    model = to_transformers(header, tensors)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer(pieces, header.seq_len).save_pretrained(out)
    logger.info("converted %s (llama2.c v%d, dim %d, %d layers, vocab %d) into %s.",
                checkpoint, header.version, header.dim, header.n_layers, header.vocab_size, out)
    return out
