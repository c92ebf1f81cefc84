"""``lmtune export gguf``: the written file, read back by transformers, is the merged model.

transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) is the independent
reader: it undoes llama.cpp's Q/K row order, rebuilds the config from ``llama.*`` keys and
the tokenizer from ``tokenizer.ggml.*``. Adapters use ``init_lora_weights=False`` so the
merge is not a no-op.

Tolerances (relative: ||gguf - merged|| / ||merged|| over all logits), measured on these
tiny random models: f32 is exact (we assert 1e-5 absolute); f16 measured ~1.5e-3 (asserted
1e-2); q8_0 measured ~3e-2 (asserted 6e-2; random tiny weights are its worst case, SmolLM2
is measured in the realmodel test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from gguf import GGUFReader
from peft import LoraConfig, get_peft_model
from test_families import FAMILIES, TOKENIZERS, Family, build_family
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmtune.cli import main
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.export.gguf import check_family, export_gguf

TEXTS = ["Give three tips for staying healthy.", "Hello  world!\n12345 naïve café 🦙", "The sky is blue."]
RELATIVE_TOLERANCE = {"f32": 1e-6, "f16": 1e-2, "q8_0": 6e-2}


def _adapter(base_dir: Path, out: Path):
    """A saved LoRA adapter on every linear layer, and the merged model it stands for."""
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    return out, model.merge_and_unload().eval()


def _read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def _greedy(model, ids: torch.Tensor, tokens: int = 8) -> list[int]:
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA wide enough (hidden 64) for q8_0's 32-value blocks, with the BPE demo tokenizer."""
    path = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=64, intermediate_size=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_gives_the_merged_model(dtype, llama64_dir, tokenizer, tmp_path):
    adapter, merged = _adapter(llama64_dir, tmp_path / "adapter")
    out = export_gguf(tmp_path / "model.gguf", base=str(llama64_dir), adapter=adapter, dtype=dtype)

    model, gguf_tokenizer = _read_back(out)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        got, expected = model(ids).logits, merged(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(llama64_dir)(ids).logits
    assert _relative_error(plain, expected) > 0.1  # the adapter does change the model
    assert _relative_error(got, expected) < RELATIVE_TOLERANCE[dtype]
    if dtype == "f32":
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if dtype != "q8_0":  # q8_0 can flip near-ties among a random tiny model's flat logits
        assert _greedy(model, ids) == _greedy(merged, ids)
    for text in TEXTS:
        assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert (gguf_tokenizer.bos_token, gguf_tokenizer.eos_token, gguf_tokenizer.pad_token, gguf_tokenizer.unk_token) \
        == ("<s>", "</s>", "<pad>", "<unk>")


def test_gguf_metadata_is_in_llama_cpp_key_names(llama64_dir, tokenizer, tmp_path):
    out = export_gguf(tmp_path / "model.gguf", base=str(llama64_dir), dtype="q8_0")
    reader = GGUFReader(out)
    fields = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.embedding_length"], fields["llama.block_count"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"]) == (64, 2, 4, 2, 16)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # <unk> <s> </s> <pad>: control tokens
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) and fields["tokenizer.ggml.merges"]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in kinds  # this model's head is not tied


@pytest.mark.slow  # ~30 s: transformers rebuilds 32000-token merges from the scores when it reads the file back
def test_llama_sentencepiece_vocabulary_matches_sentencepiece(tmp_path, tokenizer):
    """The LLaMA tokenizer (no tokenizer.model left after transformers saves it) against SentencePiece itself."""
    import sentencepiece

    base, _ = build_family(FAMILIES["llama"], tmp_path / "base", tokenizer)
    adapter, merged = _adapter(base, tmp_path / "adapter")
    out = export_gguf(tmp_path / "model.gguf", base=str(base), adapter=adapter, dtype="f32")

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2c_tokenizer.model"))
    fields = GGUFReader(out).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    scores = np.array(fields["tokenizer.ggml.scores"].contents())
    n = sp.get_piece_size()
    assert tokens == [sp.id_to_piece(i) for i in range(n)]
    expected_types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    assert types == expected_types
    merged_pieces = [i for i in range(n) if expected_types[i] == 1 and len(tokens[i]) > 1]
    sp_scores = np.array([sp.get_score(i) for i in merged_pieces])
    assert (np.argsort(-sp_scores, kind="stable") == np.argsort(-scores[merged_pieces], kind="stable")).all()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True

    model, gguf_tokenizer = _read_back(out)
    # transformers' GGUF reader drops SentencePiece's extra "▁" before text that starts with a
    # space (llama.cpp keeps it), so the texts compared here start with a letter.
    for text in TEXTS:
        assert gguf_tokenizer(text).input_ids == sp.encode(text, add_bos=True) == [1, *sp.encode(text)]
    ids = torch.tensor([sp.encode("Once upon a time", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)


def test_mistral_exports_as_llama(tmp_path, tokenizer):
    base, _ = build_family(Family("mistral-demo", "mistral", FAMILIES["mistral"].config), tmp_path / "base", tokenizer)
    adapter, merged = _adapter(base, tmp_path / "adapter")
    out = export_gguf(tmp_path / "model.gguf", base=str(base), adapter=adapter, dtype="f16")
    model, _ = _read_back(out)
    ids = tokenizer(TEXTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        assert _relative_error(model(ids).logits, merged(ids).logits) < RELATIVE_TOLERANCE["f16"]


def test_cli_exports_a_base_model_and_never_overwrites_silently(tiny_llama_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "base.gguf"
    out.write_bytes(b"keep me")
    argv = ["export", "gguf", "--model_name_or_path", str(tiny_llama_dir), "--output", str(out), "--dtype", "f32"]

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output {out} exists" in err and "pass --overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert main([*argv, "--overwrite"]) == 0
    assert not out.with_name("base.gguf.partial").exists()
    model, _ = _read_back(out)
    ids = tokenizer(TEXTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


def test_refusals_name_the_problem(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"name the file \*\.gguf"):
        export_gguf(tmp_path / "model.bin", base=str(tiny_llama_dir))
    (tmp_path / "there.gguf").write_text("x")
    with pytest.raises(ConfigError, match="exists; choose another name, or pass --overwrite"):
        export_gguf(tmp_path / "there.gguf", base=str(tiny_llama_dir))
    assert main(["export", "onnx"]) == 2


def test_unsupported_family_is_refused_before_any_work(tmp_path, tokenizer):
    base, _ = build_family(FAMILIES["phi"], tmp_path / "phi", tokenizer)
    with pytest.raises(UnsupportedError, match=r"model type 'phi' is not supported for GGUF export; supported: "
                                               r"llama \(LLaMA, SmolLM2, TinyLlama\), mistral"):
        export_gguf(tmp_path / "phi.gguf", base=str(base))
    assert list(tmp_path.glob("*.gguf*")) == []


def test_adapter_of_another_base_is_refused(tmp_path, tokenizer, tiny_llama_dir):
    adapter, _ = _adapter(tiny_llama_dir, tmp_path / "adapter")  # hidden 16
    other = tmp_path / "wider"
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=32)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"does not fit the base model .*wider.*size mismatch"):
        export_gguf(tmp_path / "model.gguf", base=str(other), adapter=adapter)
    assert not (tmp_path / "model.gguf").exists()


def test_vocabulary_is_padded_to_the_embedding_rows_and_never_truncated(tiny_llama_dir, tokenizer):
    from lmtune.export.gguf_vocab import read_vocab

    vocab = read_vocab(tiny_llama_dir, len(tokenizer) + 3)
    assert vocab.tokens[-3:] == [f"[PAD{len(tokenizer) + i}]" for i in range(3)] and vocab.types[-3:] == [5, 5, 5]
    with pytest.raises(UnsupportedError, match=rf"has {len(tokenizer)} tokens but the model only 100 embedding rows"):
        read_vocab(tiny_llama_dir, 100)


@pytest.mark.parametrize(("model", "pre_tokenizer", "message"), [
    ("unigram", None, "a Unigram tokenizer is not supported for GGUF export"),
    ("bpe", "whitespace", "the pre-tokenizer .*Whitespace.* has no llama.cpp equivalent"),
])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(model, pre_tokenizer, message, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lmtune.export.gguf_vocab import read_vocab

    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0) if model == "unigram"
                        else models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    backend.decoder = decoders.ByteLevel()
    if pre_tokenizer:
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedError, match=message):
        read_vocab(tmp_path, 8)


def test_rotary_scaling_is_written_when_linear_and_refused_otherwise():
    from gguf import GGUFWriter

    from lmtune.export.gguf import add_hyperparameters

    linear = tiny_llama_config(64, rope_scaling={"rope_type": "linear", "factor": 4.0})
    check_family(linear, "linear")
    writer = GGUFWriter(None, "llama")
    add_hyperparameters(writer, linear)
    kv = {key: value.value for key, value in writer.kv_data[0].items()}
    assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == 4.0
    assert kv["llama.rope.freq_base"] == 10000.0 and kv["llama.rope.dimension_count"] == 4
    yarn = tiny_llama_config(64, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 128})
    with pytest.raises(UnsupportedError, match="rotary scaling 'yarn' is not supported for GGUF export"):
        check_family(yarn, "yarn")


def test_llama3_rotary_factors_follow_the_llama_3_1_rule():
    """llama.cpp divides each frequency by rope_freqs; LLaMA 3.1 keeps high frequencies, divides low ones by
    `factor`, and blends in between (checked by hand against llama.cpp: 1.2e-4 relative on a tiny model)."""
    from lmtune.export.gguf import llama3_rope_factors

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    config = tiny_llama_config(64, hidden_size=64, rope_scaling=rope)
    check_family(config, "llama3")
    freqs = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    wavelengths, low, high = 2 * np.pi / freqs, 16 / 1.0, 16 / 4.0
    smooth = (16 / wavelengths - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelengths < high, 1.0, np.where(wavelengths > low, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    assert np.allclose(llama3_rope_factors(config), expected, rtol=1e-6)
    assert ((expected > 1.0) & (expected < 8.0)).any() and (expected == 8.0).any()  # blended and divided bands


def _byte_level_tokenizer(pre_tokenizer, texts: list[str]):
    """A byte-level BPE like the demo tokenizer, with another pre-tokenizer (SmolLM2's, LLaMA-3's)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_byte_level_pre_tokenizers_round_trip(pre, demo_records, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    from lmtune.export.gguf_vocab import _LLAMA3_SPLIT

    shapes = {
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in demo_records]
    tokenizer = _byte_level_tokenizer(shapes[pre], [*texts, "In 2024, 12345 + 678 = 13023."])
    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=2)
                     ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = export_gguf(tmp_path / "model.gguf", base=str(base), dtype="f32", modelfile=False)

    assert GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in [*TEXTS, "In 2024, 12345 + 678 = 13023.", "  two spaces\n\nand lines"]:
        assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids


def test_unsupported_tokenizer_is_refused_before_the_merge(tiny_llama_dir, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import lmtune.export.gguf as gguf_export

    base = tmp_path / "wordpiece"
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(base)
    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(base)
    monkeypatch.setattr(gguf_export, "_materialize", lambda *a: pytest.fail("merged before checking the tokenizer"))
    with pytest.raises(UnsupportedError, match="a WordPiece tokenizer is not supported for GGUF export"):
        export_gguf(tmp_path / "model.gguf", base=str(base))


def test_adapter_of_another_base_with_the_same_shapes_is_merged_with_a_warning(tiny_llama_dir, tokenizer, tmp_path,
                                                                               caplog):
    adapter, _ = _adapter(tiny_llama_dir, tmp_path / "adapter")  # peft records tiny_llama_dir as its base
    twin = tmp_path / "twin"
    torch.manual_seed(7)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(twin)
    tokenizer.save_pretrained(twin)
    with caplog.at_level("WARNING", logger="lmtune.export.gguf"):
        export_gguf(tmp_path / "model.gguf", base=str(twin), adapter=adapter, dtype="f32", modelfile=False)
    assert f"was trained on {tiny_llama_dir}, not on --model_name_or_path {twin}" in caplog.text
