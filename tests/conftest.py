"""Shared fixtures: tiny random models built from configs, tokenizers built locally, real data.

Nothing here downloads: models are random-weight configs saved to a temporary directory,
tokenizers are trained at session start, and real data is read from ``../shared/data``
(tests that need it skip with a clear message where that folder is absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.demo import build_demo_tokenizer, load_demo_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
REFERENCE_PAGE = PROJECT_ROOT.parent / "shared" / "seed" / "neuralchat-finetuning.md"


def require_shared_data() -> Path:
    """The real public data folder, or a skip that says where it was looked for."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the project as ../shared/data)")
    return SHARED_DATA


def require_reference_page() -> Path:
    """The NeuralChat reference page, or a skip that says where it was looked for."""
    if not REFERENCE_PAGE.is_file():
        pytest.skip(f"reference page {REFERENCE_PAGE} is absent (it sits beside the project as ../shared/seed)")
    return REFERENCE_PAGE


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run tiny models, which are fastest on one thread (about 10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def demo_records() -> list[dict[str, str]]:
    return load_demo_records()


@pytest.fixture(scope="session")
def tokenizer(demo_records):
    """A LLaMA-like BPE tokenizer (BOS added, EOS not) trained on lmtune's demo texts."""
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in demo_records]
    return build_demo_tokenizer(texts, vocab_size=512)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random LLaMA (fp32, seeded) with its tokenizer: a stand-in for a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def alpaca_file(tmp_path, demo_records) -> Path:
    """40 Alpaca-schema records (with and without input) as a JSON array."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps(demo_records[:40]), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """lmtune's own tiny pretrained demo model (built in seconds), for tests where the loss must move."""
    from lmtune.demo import build_demo_model

    threads = torch.get_num_threads()
    try:
        return build_demo_model(tmp_path_factory.mktemp("demo") / "model")
    finally:
        torch.set_num_threads(threads)
