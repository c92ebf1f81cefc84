"""Every ``--peft`` method and ``--full_finetune`` on LLaMA; what peft cannot do fails before training.

"Only the adapter trains" is checked on the real trained model: after ``finetune`` the
base weights equal the saved checkpoint bit for bit and every trainable tensor moved.
``test_support_matrix`` runs the model-level check for every family x method and compares the
results with ``docs/support_matrix.md``, which ``scripts/write_support_matrix.py`` writes.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from conftest import PROJECT_ROOT
from lmtune.data.collate import CausalLMCollator
from lmtune.errors import ConfigError
from lmtune.model.adapters import PEFT_METHODS, AdapterSettings, apply_adapter
from test_families import FAMILIES, T5, Family

METHOD_FLAGS = {
    "lora": {"peft": "lora"},
    "dora": {"peft": "lora", "use_dora": True},
    "rslora": {"peft": "lora", "use_rslora": True},
    "ia3": {"peft": "ia3"},
    "prefix": {"peft": "prefix", "num_virtual_tokens": 4},
    "prompt": {"peft": "prompt", "num_virtual_tokens": 4},
    "ptun": {"peft": "ptun", "num_virtual_tokens": 4, "ptun_hidden_size": 32},
    "llama_adapter": {"peft": "llama_adapter", "adapter_len": 4},
    "full_finetune": {"full_finetune": True},
}


@pytest.fixture
def trainer_with_start(monkeypatch):
    """Keeps the real trainer ``finetune`` builds and a copy of its trainable weights before training."""
    import lmtune.finetuning

    seen: dict = {}
    real = lmtune.finetuning.build_trainer

    def spy(model, *args, **kwargs):
        seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen["trainer"] = real(model, *args, **kwargs)
        return seen["trainer"]

    monkeypatch.setattr(lmtune.finetuning, "build_trainer", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_every_method_trains_only_its_own_weights_on_llama(method, tiny_llama_dir, alpaca_file, tmp_path,
                                                           trainer_with_start):
    from lmtune.finetuning import finetune

    out = tmp_path / "out"
    flags = dict(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(out),
                 do_train=True, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, max_seq_length=128,
                 save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1)
    metrics = finetune(**flags, **METHOD_FLAGS[method])
    assert metrics["train_loss"] > 0

    model = trainer_with_start["trainer"].model
    start = trainer_with_start["start"]
    saved_base = load_file(tiny_llama_dir / "model.safetensors")
    moved = [n for n, p in model.named_parameters() if n in start and not torch.equal(p.detach(), start[n])]
    assert moved and set(moved) == set(start), f"trainable tensors that did not move: {set(start) - set(moved)}"
    if method == "full_finetune":
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        reloaded = load_file(out / "model.safetensors")
        assert any(not torch.equal(reloaded[k], saved_base[k]) for k in saved_base)
        return
    # Adapters wrap base layers (LoRA's ".base_layer", LLaMA-Adapter's "self_attn.model"): map back to plain names.
    frozen = {n.replace(".base_layer", "").replace("self_attn.model.", "self_attn."): p.detach()
              for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    assert set(saved_base) <= set(frozen)
    assert all(torch.equal(saved_base[k], frozen[k]) for k in saved_base), "a base weight changed"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config.get("use_dora", False) == (method == "dora")
    assert adapter_config.get("use_rslora", False) == (method == "rslora")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def _tiny(model_type_or_family: Family, vocab: int = 64):
    family = model_type_or_family
    config = AutoConfig.for_model(family.model_type, vocab_size=vocab, **family.config)
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config)


def test_reference_defaults_and_adapter_layers_capped_with_a_notice(caplog):
    model = _tiny(FAMILIES["llama"])
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        peft_model = apply_adapter(model, AdapterSettings(peft="llama_adapter"))
    config = peft_model.peft_config["default"]
    assert (config.adapter_layers, config.adapter_len) == (2, 10)
    assert "--adapter_layers 30 is more than the model's 2 layers; using 2." in caplog.text
    ptun = apply_adapter(_tiny(FAMILIES["llama"]), AdapterSettings(peft="ptun")).peft_config["default"]
    assert (ptun.num_virtual_tokens, ptun.encoder_hidden_size) == (10, 1024)
    lora = apply_adapter(_tiny(FAMILIES["llama"]), AdapterSettings()).peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.05)


def test_combinations_peft_cannot_do_fail_before_training(tmp_path, tiny_llama_dir, alpaca_file):
    from lmtune.finetuning import finetune

    with pytest.raises(ConfigError, match="LLaMA-Adapter supports model types gpt2, llama, mistral; this model is "
                                          "'falcon'. Use --peft lora"):
        apply_adapter(_tiny(FAMILIES["falcon"]), AdapterSettings(peft="llama_adapter"))
    with pytest.raises(ConfigError, match="--peft prefix with --dataset_concatenation: .* Drop --dataset_conc"):
        finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(alpaca_file), output_dir=str(tmp_path / "o"),
                 do_train=True, peft="prefix", dataset_concatenation=True, use_cpu=True, report_to="none")
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="--peft magic is unknown; choose one of lora, ia3"):
        apply_adapter(_tiny(FAMILIES["llama"]), AdapterSettings(peft="magic"))


@pytest.mark.parametrize("method", ["prompt", "ptun", "prefix", "llama_adapter"])
def test_virtual_tokens_respect_the_collators_padding(method):
    """Padded rows compute what the sample computes alone, with the virtual tokens in front."""
    settings = AdapterSettings(peft=method, **{k: v for k, v in METHOD_FLAGS[method].items() if k != "peft"})
    model = apply_adapter(_tiny(FAMILIES["llama"]), settings).eval()
    long, short = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    batch = CausalLMCollator(0)([{"input_ids": long, "labels": long}, {"input_ids": short, "labels": short}])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    virtual = padded.shape[1] - batch["input_ids"].shape[1]
    torch.testing.assert_close(padded[1, virtual:virtual + 3], alone[0, -3:], rtol=0, atol=1e-5)


def test_llama_adapter_keeps_packed_samples_apart():
    model = apply_adapter(_tiny(FAMILIES["llama"]), AdapterSettings(peft="llama_adapter", adapter_len=4)).eval()
    for name, param in model.named_parameters():
        if "adaption_gate" in name:
            param.data.fill_(0.5)  # gates start at zero, which would hide any leak
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        # No KV cache, as in training: with one, transformers builds no block-diagonal mask from positions.
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(packed[:, 4:], alone, rtol=0, atol=1e-5)


# ---- the support matrix -------------------------------------------------------------------------------------

MATRIX_METHODS = ["lora", "dora", "rslora", "ia3", "prefix", "prompt", "ptun", "llama_adapter"]


def _check_cell(family: Family, method: str, tmp_path: Path) -> str:
    """Train three steps, save, reload with peft (same logits), generate: '✓', or the error peft/lmtune gave."""
    flags = {k: v for k, v in METHOD_FLAGS[method].items() if k != "peft"}
    try:
        model = apply_adapter(_tiny(family), AdapterSettings(peft=METHOD_FLAGS[method]["peft"], **flags))
    except ConfigError as err:
        return "✗ refused before training: " + str(err).split(":")[0]
    seq2seq = model.get_base_model().config.is_encoder_decoder
    ids = torch.tensor([[3, 9, 14, 27, 33, 41]])
    kwargs = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids[:, :4] if seq2seq else ids, **kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters() if n in start)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_tiny(family), tmp_path).eval()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, **kwargs).logits
        torch.testing.assert_close(reloaded(input_ids=ids, **kwargs).logits, expected, rtol=0, atol=1e-5)
    out = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1
    return "✓"


def _check_full_finetune(family: Family, tmp_path: Path) -> str:
    """Every weight trains, and the saved whole model reloads with the same logits."""
    model = _tiny(family)
    seq2seq = model.config.is_encoder_decoder
    ids = torch.tensor([[3, 9, 14, 27, 33, 41]])
    kwargs = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids[:, :4] if seq2seq else ids, **kwargs).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, **kwargs).logits
        torch.testing.assert_close(reloaded(input_ids=ids, **kwargs).logits, expected, rtol=0, atol=1e-5)
    return "✓"


def _packing_mode(family: Family) -> str:
    from lmtune.train.packing_check import check_packing_isolation

    return "—" if family is T5 else check_packing_isolation(_tiny(family))


MATRIX_FILE = PROJECT_ROOT / "docs" / "support_matrix.md"
MATRIX_SCRIPT = "python scripts/write_support_matrix.py"


def matrix_rows(tmp_path: Path) -> list:
    """Every family x method, checked now: (family, cells, packing mode) per family."""
    rows = []
    for family in [*FAMILIES.values(), T5]:
        cells = [_check_cell(family, method, tmp_path / f"{family.name}-{method}") for method in MATRIX_METHODS]
        cells.append(_check_full_finetune(family, tmp_path / f"{family.name}-full"))
        rows.append((family, cells, _packing_mode(family)))
    return rows


def _versions_line(line: str) -> bool:
    return line.startswith("Checked with ")


@pytest.mark.slow
def test_support_matrix(tmp_path):
    """Every family x method, checked now; docs/support_matrix.md must be this check's output."""
    rows = matrix_rows(tmp_path)
    for family, cells, _ in rows:
        for method, cell in zip([*MATRIX_METHODS, "full_finetune"], cells):
            refused_ok = method == "llama_adapter" and family.model_type not in ("llama", "mistral")
            assert cell == "✓" or (refused_ok and cell.startswith("✗ refused")), (family.name, method, cell)
    # The library versions it was last written with may differ from this machine's: compare the rest.
    expected = [line for line in render_matrix(rows).splitlines() if not _versions_line(line)]
    written = [line for line in MATRIX_FILE.read_text(encoding="utf-8").splitlines() if not _versions_line(line)]
    assert written == expected, f"{MATRIX_FILE} is out of date: run {MATRIX_SCRIPT}"


def render_matrix(rows) -> str:
    versions = ", ".join(f"{lib} {metadata.version(lib)}" for lib in ("transformers", "peft", "torch"))
    lines = [
        "# Support matrix: model family x adapter method",
        "",
        f"Written by `{MATRIX_SCRIPT}` and checked by `tests/test_adapters.py::test_support_matrix`",
        "(do not edit by hand): for each cell a tiny random model of the family gets the adapter through",
        "`lmtune.model.adapters.apply_adapter`, trains three steps (every trainable tensor must move), is saved,",
        "reloads with `peft.PeftModel.from_pretrained` with identical logits, and generates. `✗` cells are",
        "refused with a clear error before any training.",
        f"Checked with {versions}.",
        "",
        "| family (model_type) | " + " | ".join(MATRIX_METHODS) + " | full fine-tune | packing |",
        "|---|" + "---|" * (len(MATRIX_METHODS) + 2),
    ]
    for family, cells, packing in rows:
        short = ["✓" if c == "✓" else "✗" for c in cells]
        lines.append(f"| {family.name} (`{family.model_type}`) | " + " | ".join(short) + f" | {packing} |")
    lines += [
        "",
        "- `llama_adapter`: peft's LLaMA-Adapter exists for model types llama, mistral and gpt2 only.",
        "- full fine-tune: every weight trains, and the saved whole model (safetensors) reloads with the same logits.",
        "- packing (`--dataset_concatenation`): `position_ids` = restarting positions isolate packed samples;",
        "  `block_mask` = the model ignores positions (ALiBi), so lmtune passes an explicit block-diagonal mask.",
        "  Prompt-learning methods (prefix, prompt, ptun) refuse packing: peft drops `position_ids`.",
        "- FLAN-T5 is checked at the model level here; its training path is `finetune_seq2seq`.",
        "",
    ]
    return "\n".join(lines)


def test_method_table_is_explicit():
    assert list(PEFT_METHODS) == ["lora", "ia3", "llama_adapter", "ptun", "prefix", "prompt"]
