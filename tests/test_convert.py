"""``lmtune convert llama2c``: a real pretrained checkpoint becomes a working transformers model.

stories260K (karpathy/llama2.c, trained on TinyStories) must generate greedily from BOS
exactly the text llama2.c documents for it; that pins the header parsing, the weight
order, the RoPE permutation, the norm epsilon and the tokenizer at once. The end-to-end
test then teaches it a new style with LoRA through ``finetune_clm``'s code path.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import require_shared_data
from test_families import trainer_spy  # noqa: F401 (fixture)
from lmtune.cli import main
from lmtune.errors import ConfigError
from lmtune.export.convert_llama2c import (
    MAGIC_V1,
    V1_HEADER_BYTES,
    convert_llama2c,
    read_checkpoint,
    read_tokenizer,
)


@pytest.fixture(scope="module")
def stories() -> Path:
    folder = require_shared_data() / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"{folder} holds no stories260K.bin")
    return folder


@pytest.fixture(scope="module")
def converted(stories, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories260K-hf")
    assert main(["convert", "llama2c", str(stories / "stories260K.bin"), str(stories / "tok512.bin"), str(out),
                 "--overwrite_output_dir"]) == 0
    return out


def _expected_text(stories: Path) -> str:
    file = stories / "EXPECTED_GREEDY.txt"
    if file.is_file():
        return file.read_text(encoding="utf-8").rstrip("\n")  # run.c ends its output with a newline
    return "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def test_converted_stories260k_reproduces_llama2c_greedy_text(converted, stories):
    config = json.loads((converted / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 5, 4)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    expected = _expected_text(stories)
    # run.c with -t 0.0 prints one token per position up to its 256-step budget, BOS being position 0.
    out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=256, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text == expected if (stories / "EXPECTED_GREEDY.txt").is_file() else text.startswith(expected)


def test_tokenizer_matches_llama2c_encoding(converted, stories):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    pieces = read_tokenizer(stories / "tok512.bin", 512)
    ids = tokenizer("Once upon a time, Lily").input_ids
    assert ids[0] == 1
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["▁Once", "▁upon", "▁a", "▁time", ",", "▁Lily"]
    assert [pieces[i][0] for i in ids[1:]] == tokenizer.convert_ids_to_tokens(ids[1:])
    # Characters outside the 512 pieces fall back to their UTF-8 bytes (ids 3..258), and decode back.
    text = "Lily ate 🍎."
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert any(3 <= i < 259 for i in encoded) and tokenizer.decode(encoded) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


def _as_version1(v0_file: Path) -> bytes:
    """Re-serialize a version 0 checkpoint in llama2.c's version 1 layout (export.py's ``version1_export``)."""
    header, tensors = read_checkpoint(v0_file)
    fields = (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads, header.vocab_size,
              header.seq_len)
    head = struct.pack("<Ii", MAGIC_V1, 1) + struct.pack("<7i", *fields) + struct.pack("<B", header.shared_classifier)
    head += b"\0" * (V1_HEADER_BYTES - len(head))
    order = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    body = b""
    for kind in order:
        names = [kind] if kind in ("norm", "tok_embeddings") else [f"{kind}.{i}" for i in range(header.n_layers)]
        body += b"".join(tensors[n].numpy().astype("<f4").tobytes() for n in names)
    return head + body


def test_version1_checkpoint_converts_to_the_same_weights(stories, converted, tmp_path):
    v1 = tmp_path / "stories260K_v1.bin"
    v1.write_bytes(_as_version1(stories / "stories260K.bin"))
    out = convert_llama2c(v1, stories / "tok512.bin", tmp_path / "v1-hf")
    ours, reference = load_file(out / "model.safetensors"), load_file(converted / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name


def test_convert_errors_name_the_file_and_the_fix(stories, tmp_path, capsys):
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes((stories / "stories260K.bin").read_bytes()[:5000])
    with pytest.raises(ConfigError, match="cut.bin: 5000 bytes, but its header .* needs 1056540"):
        read_checkpoint(truncated)
    v2 = tmp_path / "q80.bin"
    v2.write_bytes(struct.pack("<Ii", MAGIC_V1, 2) + b"\0" * 300)
    with pytest.raises(ConfigError, match="version 2 is not supported.*--version 1"):
        read_checkpoint(v2)
    with pytest.raises(ConfigError, match="holds more than the model's 256 tokens"):
        read_tokenizer(stories / "tok512.bin", 256)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["convert", "llama2c", str(stories / "stories260K.bin"), str(stories / "tok512.bin"), str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err


STYLE = [
    ("the cat", "Yarr, the cat be sailin' the seven seas, matey!"),
    ("the dog", "Yarr, the dog be diggin' for buried treasure, matey!"),
    ("the bird", "Yarr, the bird be singin' from the crow's nest, matey!"),
    ("the fish", "Yarr, the fish be swimmin' under the plank, matey!"),
    ("the frog", "Yarr, the frog be hoppin' on the poop deck, matey!"),
    ("the sun", "Yarr, the sun be shinin' on the Jolly Roger, matey!"),
    ("the moon", "Yarr, the moon be glowin' over the rum barrels, matey!"),
    ("the tree", "Yarr, the tree be growin' on the treasure island, matey!"),
    ("the boat", "Yarr, the boat be rockin' in the stormy waves, matey!"),
    ("the ball", "Yarr, the ball be rollin' across the ship's deck, matey!"),
    ("the girl", "Yarr, the girl be steerin' the mighty galleon, matey!"),
    ("the boy", "Yarr, the boy be polishin' the cannon, matey!"),
    ("the cake", "Yarr, the cake be hidin' in the captain's chest, matey!"),
    ("the car", "Yarr, the car be sinkin' to Davy Jones' locker, matey!"),
    ("the bear", "Yarr, the bear be guardin' the gold doubloons, matey!"),
    ("the king", "Yarr, the king be walkin' the plank, matey!"),
    ("the mouse", "Yarr, the mouse be stealin' the ship's biscuits, matey!"),
    ("the star", "Yarr, the star be guidin' our sails home, matey!"),
    ("the rain", "Yarr, the rain be soakin' the crew to the bone, matey!"),
    ("the duck", "Yarr, the duck be paddlin' past the harbour, matey!"),
    ("the hat", "Yarr, the hat be flyin' off in the wind, matey!"),
    ("the flower", "Yarr, the flower be bloomin' by the lighthouse, matey!"),
    ("the baby", "Yarr, the baby be sleepin' in a hammock, matey!"),
    ("the toy", "Yarr, the toy be washin' up on the shore, matey!"),
]
HELD_OUT = [
    ("the horse", "Yarr, the horse be gallopin' along the beach, matey!"),
    ("the snow", "Yarr, the snow be fallin' on the frozen mast, matey!"),
    ("the kite", "Yarr, the kite be soarin' above the crow's nest, matey!"),
    ("the apple", "Yarr, the apple be rollin' into the bilge, matey!"),
]


def _records(pairs):
    return [{"instruction": f"Tell me about {thing}.", "input": "", "output": answer} for thing, answer in pairs]


@pytest.mark.slow
def test_lora_teaches_the_converted_model_a_new_style(converted, tmp_path, trainer_spy):
    from lmtune.finetuning import finetune

    (tmp_path / "train.json").write_text(json.dumps(_records(STYLE)))
    (tmp_path / "held_out.json").write_text(json.dumps(_records(HELD_OUT)))
    base_before = load_file(converted / "model.safetensors")
    common = dict(model_name_or_path=str(converted), validation_file=str(tmp_path / "held_out.json"),
                  max_seq_length=128, per_device_eval_batch_size=4, report_to="none", disable_tqdm=True,
                  use_cpu=True, seed=0)
    before = finetune(output_dir=str(tmp_path / "before"), do_eval=True, **common)
    after = finetune(train_file=str(tmp_path / "train.json"), output_dir=str(tmp_path / "lora"), do_train=True,
                     do_eval=True, peft="lora", lora_all_linear=True, lora_rank=8, learning_rate=1e-2,
                     num_train_epochs=6, per_device_train_batch_size=8, save_strategy="no", logging_steps=3,
                     **common)
    assert after["eval_loss"] < before["eval_loss"] - 0.5, (before["eval_loss"], after["eval_loss"])
    # The trained model's base weights are still the checkpoint's, bit for bit; only LoRA moved.
    trained = trainer_spy[-1].model
    base_now = {name.replace(".base_layer", ""): p.detach()
                for name, p in trained.get_base_model().named_parameters() if not p.requires_grad}
    assert set(base_before) <= set(base_now)
    assert all(torch.equal(base_before[k], base_now[k]) for k in base_before)
    lora = [p for name, p in trained.named_parameters() if "lora_B" in name]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # lora_B starts at zero
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
