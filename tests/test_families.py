"""Every family of the reference's validated list (and one it lacks) trains, saves, reloads and generates.

Each family is a tiny random model built from its transformers config (hidden 16, two
layers), saved to a temporary directory with the tokenizer that family really uses
where ``../shared/data/tokenizers`` has it: LLaMA's SentencePiece model for LLaMA and
Mistral, GPT-NeoX-20B's ``tokenizer.json`` (as a separate ``--tokenizer_name``) for MPT,
GPT-2's BPE files for StarCoder. The rest use the local demo tokenizer. Training goes
through the ``finetune_clm`` entry point in-process; a spy on ``build_trainer`` keeps the
real trainer so the in-memory model can be compared with the saved adapter.

``FAMILIES`` and ``build_family`` are shared with the adapter, merge and QLoRA tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Tokenizer,
    PreTrainedModel,
)

from conftest import SHARED_DATA, write_jsonl

TOKENIZERS = SHARED_DATA / "tokenizers"


@dataclass(frozen=True)
class Family:
    """A model family as the tests build it."""

    name: str
    model_type: str
    config: dict
    tokenizer: str = "demo"  # demo | llama_sp | neox_json | gpt2
    hub_remote_code: bool = False  # config.json names shipped code (auto_map), as MPT's hub repo does
    packed: bool = False  # train with --dataset_concatenation, as the reference's command line does
    extra_flags: dict = field(default_factory=dict)


_ATTN = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "llama", _ATTN, tokenizer="llama_sp"),
    Family("mistral", "mistral", dict(_ATTN, sliding_window=64), tokenizer="llama_sp"),
    Family("mixtral", "mixtral", dict(_ATTN, num_local_experts=4, num_experts_per_tok=2)),
    Family("mpt", "mpt", dict(d_model=16, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=256),
           tokenizer="neox_json", hub_remote_code=True, packed=True, extra_flags={"trust_remote_code": True}),
    Family("falcon", "falcon", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True), packed=True),
    Family("phi", "phi", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)),
    Family("gemma", "gemma", dict(_ATTN, num_key_value_heads=1, head_dim=4)),
    Family("starcoder", "gpt_bigcode", dict(n_embd=16, n_layer=2, n_head=4, n_positions=256), tokenizer="gpt2"),
    Family("qwen2", "qwen2", _ATTN),  # not in the reference's list: no lmtune code names it
]}
T5 = Family("flan-t5", "t5", dict(d_model=16, d_ff=32, num_layers=2, num_heads=4, d_kv=4, decoder_start_token_id=0))


@dataclass(frozen=True)
class _Ids:
    """The sizes a config needs, read without building a transformers tokenizer."""

    size: int
    bos_token_id: int
    eos_token_id: int

    def __len__(self) -> int:
        return self.size


def _save_tokenizer(family: Family, path: Path, demo_tokenizer) -> tuple[object, str | None]:
    """Write the family's tokenizer into ``path``; returns it and the --tokenizer_name to pass, if separate."""
    if family.tokenizer == "llama_sp":
        # A bare SentencePiece file, as llama2.c and many LLaMA exports ship it (no tokenizer_config.json).
        import sentencepiece

        (path / "tokenizer.model").symlink_to(TOKENIZERS / "llama2c_tokenizer.model")
        # sentencepiece reads the ids in milliseconds; the conversion to a fast tokenizer is left to the run.
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        return _Ids(sp.get_piece_size(), sp.bos_id(), sp.eos_id()), None
    if family.tokenizer == "neox_json":
        from transformers import PreTrainedTokenizerFast

        file = TOKENIZERS / "gpt-neox-20B_tokenizer.json"
        return PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token="<|endoftext|>"), str(file)
    if family.tokenizer == "gpt2":
        tokenizer = GPT2Tokenizer(vocab=str(TOKENIZERS / "gpt2-vocab.json"), merges=str(TOKENIZERS / "gpt2-merges.txt"))
        tokenizer.save_pretrained(path)
        return tokenizer, None
    demo_tokenizer.save_pretrained(path)
    return demo_tokenizer, None


def build_family(family: Family, path: Path, demo_tokenizer, seed: int = 0) -> tuple[Path, str | None]:
    """Save a tiny random model of ``family`` with its tokenizer; returns (model dir, --tokenizer_name or None)."""
    if family.tokenizer != "demo" and not TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizers folder {TOKENIZERS} is absent")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_name = _save_tokenizer(family, path, demo_tokenizer)
    vocab = len(tokenizer)
    specials = {k: getattr(tokenizer, f"{k}_id") for k in ("bos_token", "eos_token")}
    config = AutoConfig.for_model(family.model_type, vocab_size=vocab, **family.config,
                                  **{f"{k}_id": v for k, v in specials.items() if v is not None})
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(path)
    if family.hub_remote_code:
        # mosaicml/mpt-7b's config.json points at modelling code the repository ships.
        config_file = path / "config.json"
        data = json.loads(config_file.read_text())
        data["auto_map"] = {"AutoConfig": "configuration_mpt.MPTConfig",
                            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}
        config_file.write_text(json.dumps(data))
    return path, tokenizer_name


def style_records(n: int = 24) -> list[dict[str, str]]:
    """Instruction records with a fixed, learnable answer style."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    things = ["ball", "kite", "boat", "hat", "cup", "book"]
    return [{"instruction": f"Name the colour of the {things[i % 6]}.", "input": "",
             "output": f"The {things[i % 6]} is {colours[i % 8]}. Ahoy!"} for i in range(n)]


def train_flags(family: Family, model_dir: Path, tokenizer_name: str | None, data: Path, out: Path,
                **overrides) -> dict:
    """The flags of a short training run, as finetune() keyword arguments."""
    flags = dict(
        model_name_or_path=str(model_dir), train_file=str(data), output_dir=str(out), do_train=True,
        max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2, lora_rank=8, max_seq_length=128,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0, **family.extra_flags,
    )
    if tokenizer_name:
        flags["tokenizer_name"] = tokenizer_name
    if family.packed:
        flags["dataset_concatenation"] = True
    flags.update(overrides)
    return flags


@pytest.fixture
def trainer_spy(monkeypatch):
    """Keeps every trainer ``finetune`` builds (the real one, unchanged) so tests can read its model."""
    import lmtune.finetuning

    built = []
    real = lmtune.finetuning.build_trainer

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(lmtune.finetuning, "build_trainer", spy)
    return built


def probe_ids(tokenizer, text: str = "Name the colour of the kite.") -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


def first_logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_saves_reloads_and_generates(name, tmp_path, tokenizer, trainer_spy):
    from peft import PeftModel

    from lmtune.argv import config_to_argv
    from lmtune.cli import main_clm
    from lmtune.model.load import load_tokenizer

    family = FAMILIES[name]
    model_dir, tokenizer_name = build_family(family, tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "style.jsonl", style_records())
    out = tmp_path / "out"
    # The reference's entry point, e.g. for MPT: --trust_remote_code True --tokenizer_name <gpt-neox-20b>
    # --dataset_concatenation True.
    assert main_clm(config_to_argv(train_flags(family, model_dir, tokenizer_name, data, out))) == 0

    losses = first_logged_losses(out)
    assert losses[-1] < losses[0], losses
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").is_file()

    trained = trainer_spy[-1].model.eval()
    tok = load_tokenizer(str(out))
    assert tok.padding_side == "right" and tok.pad_token is not None and tok.eos_token is not None
    ids = probe_ids(tok)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    generated = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4) or generated[0, -1].item() == tok.eos_token_id


def test_default_lora_targets_follow_peft_table_or_fall_back_to_every_linear(tokenizer):
    from lmtune.model.adapters import default_target_modules

    expected = {"llama": ["q_proj", "v_proj"], "mpt": ["Wqkv"], "falcon": ["query_key_value"],
                "phi": ["q_proj", "v_proj", "fc1", "fc2"], "starcoder": ["c_attn"], "mixtral": ["q_proj", "v_proj"]}
    for name, targets in expected.items():
        family = FAMILIES[name]
        config = AutoConfig.for_model(family.model_type, vocab_size=64, **family.config)
        assert default_target_modules(AutoModelForCausalLM.from_config(config)) == targets, name

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=64, **_ATTN))
    model.config.model_type = "my_new_family"
    assert default_target_modules(model) == "all-linear"


def test_t5_takes_lora_and_generates(tokenizer, tmp_path):
    from lmtune.model.adapters import AdapterSettings, apply_adapter

    model_dir, _ = build_family(T5, tmp_path / "t5", tokenizer)
    model = apply_adapter(AutoModelForSeq2SeqLM.from_pretrained(model_dir), AdapterSettings(peft="lora"))
    assert model.peft_config["default"].target_modules == {"q", "v"}
    ids = torch.tensor([[5, 6, 7, 2]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] <= 4


def test_llama_sentencepiece_tokenizer_gets_bos_pad_and_right_padding(tmp_path, tokenizer):
    from lmtune.model.load import load_tokenizer

    model_dir, _ = build_family(FAMILIES["llama"], tmp_path / "llama", tokenizer)
    tok = load_tokenizer(str(model_dir), model_type="llama")
    # transformers 5 adds no BOS for a bare tokenizer.model; LLaMA was pretrained with one.
    assert tok("Hello world").input_ids == [1, 15043, 3186]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # from the tokenizer, never forced
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    # A tokenizer config that says no BOS is obeyed.
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_tokenizer(str(model_dir), model_type="llama")("Hello world").input_ids[0] == 15043


def test_mpt_loads_with_or_without_remote_code_and_a_separate_tokenizer(tmp_path, tokenizer):
    from lmtune.model.load import load_config, load_model, load_tokenizer

    family = FAMILIES["mpt"]
    model_dir, tokenizer_json = build_family(family, tmp_path / "mpt", tokenizer)
    for trust in (False, True):
        config = load_config(str(model_dir), trust_remote_code=trust)
        model = load_model(str(model_dir), config, trust_remote_code=trust)
        assert type(model).__name__ == "MptForCausalLM"
    tok = load_tokenizer(str(model_dir), tokenizer_name=tokenizer_json)
    assert tok("Hello world").input_ids == [12092, 1533] and tok.eos_token == "<|endoftext|>"
    # The reference's form: a tokenizer directory whose config names the GPTNeoXTokenizer class.
    tok_dir = tmp_path / "neox"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").symlink_to(TOKENIZERS / "gpt-neox-20B_tokenizer.json")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    tok = load_tokenizer(str(model_dir), tokenizer_name=str(tok_dir), trust_remote_code=True)
    assert tok("Hello world").input_ids == [12092, 1533] and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token in tok.get_vocab()  # GPTNeoXTokenizer brings its own <|padding|>


def test_packing_mode_is_probed_per_family(tokenizer):
    from lmtune.train.packing_check import PACK_BY_MASK, PACK_BY_POSITIONS, check_packing_isolation

    for name in ("llama", "falcon", "mpt"):
        family = FAMILIES[name]
        config = AutoConfig.for_model(family.model_type, vocab_size=64, **family.config)
        torch.manual_seed(0)
        mode = check_packing_isolation(AutoModelForCausalLM.from_config(config))
        assert mode == (PACK_BY_MASK if name == "mpt" else PACK_BY_POSITIONS), name


def test_block_mask_collator_keeps_packed_samples_apart_on_mpt():
    from lmtune.data.collate import CausalLMCollator

    family = FAMILIES["mpt"]
    config = AutoConfig.for_model(family.model_type, vocab_size=64, **family.config)
    torch.manual_seed(0)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config).eval()
    a, b = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14]
    row = {"input_ids": a + b, "labels": a + b, "position_ids": list(range(4)) + list(range(6))}
    batch = CausalLMCollator(0, block_mask_dtype=torch.float32)([row])
    assert batch["attention_mask"].shape == (1, 1, 16, 16)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([b])).logits
    torch.testing.assert_close(packed[:, 4:10], alone, rtol=0, atol=1e-5)
