"""Tests for lmtune.demo: the shipped instruction data and the tiny local demo model."""

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.demo import (
    DEMO_MARKER,
    build_demo_model,
    build_demo_tokenizer,
    default_demo_dir,
    demo_data_path,
    load_demo_records,
)
from lmtune.errors import ConfigError

TRICKY_TEXT = "Spaces  here , there .\n\tTabs, ünïcödé 日本語, and \"quotes\"!  "
UNIT_FACTORS = {
    ("kilometers", "meters"): 1000, ("meters", "centimeters"): 100,
    ("kilograms", "grams"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
    ("days", "hours"): 24, ("liters", "milliliters"): 1000, ("weeks", "days"): 7,
    ("feet", "inches"): 12, ("yards", "feet"): 3,
}


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return load_demo_records()


@pytest.fixture(scope="module")
def record_texts(records: list[dict[str, str]]) -> list[str]:
    return [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in records]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


# --- data -------------------------------------------------------------------


def test_data_file_is_shipped_and_small() -> None:
    path = demo_data_path()
    assert path.name == "demo_instructions.jsonl"
    assert path.is_file()
    assert path.stat().st_size < 150_000


def test_records_have_alpaca_schema_without_duplicates(records: list[dict[str, str]]) -> None:
    assert len(records) >= 250
    for index, record in enumerate(records):
        assert set(record) == {"instruction", "input", "output"}, index
        assert all(isinstance(value, str) for value in record.values()), index
        assert record["instruction"].strip() and record["output"].strip(), index
    keys = [(r["instruction"], r["input"]) for r in records]
    assert len(set(keys)) == len(keys)
    empty_input = sum(1 for r in records if not r["input"]) / len(records)
    assert 0.35 <= empty_input <= 0.65


def test_arithmetic_answers_are_correct(records: list[dict[str, str]]) -> None:
    pattern = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\.$")
    operations = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    checked = 0
    for record in records:
        match = pattern.match(record["output"])
        if not match:
            continue
        a, op, b, result = match.groups()
        assert operations[op](int(a), int(b)) == int(result), record
        # The answer must be about the numbers that were asked for.
        question = record["instruction"] + " " + record["input"]
        assert sorted(re.findall(r"\d+", question)) == sorted([a, b]), record
        checked += 1
    assert checked >= 50


def test_unit_conversions_are_correct(records: list[dict[str, str]]) -> None:
    pattern = re.compile(r"^(\d+) (\w+) is (\d+) (\w+)\.$")
    checked = 0
    for record in records:
        match = pattern.match(record["output"])
        if match:
            amount, src, converted, dst = match.groups()
            assert int(amount) * UNIT_FACTORS[(src, dst)] == int(converted), record
            checked += 1
    assert checked >= 30


def test_string_answers_are_correct(records: list[dict[str, str]]) -> None:
    checked = 0
    for record in records:
        instruction, text, output = record["instruction"], record["input"], record["output"]
        if match := re.match(r'^"(\w+)" reversed is "(\w+)"\.$', output):
            assert match[1][::-1] == match[2], record
        elif instruction == "Write the word backwards.":
            assert text[::-1] == output, record
        elif instruction == "Sort the words in alphabetical order.":
            assert sorted(text.split(", ")) == output.split(", "), record
        elif match := re.match(r'^The letter "(\w)" appears (\d+) times? in "(\w+)"\.$', output):
            assert match[3].count(match[1]) == int(match[2]), record
        elif instruction == "Count the letters in the word.":
            assert output == f"{len(text)} letters.", record
        else:
            continue
        checked += 1
    assert checked >= 30


# --- tokenizer ----------------------------------------------------------------


def test_tokenizer_round_trips_with_bos_and_no_eos(record_texts: list[str]) -> None:
    tokenizer = build_demo_tokenizer(record_texts)
    for text in [*record_texts, TRICKY_TEXT]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id, text
        assert tokenizer.eos_token_id not in ids, text
        assert tokenizer.decode(ids[1:]) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.padding_side == "right"


def test_tokenizer_special_tokens_are_distinct(record_texts: list[str]) -> None:
    tokenizer = build_demo_tokenizer(record_texts, vocab_size=512)
    special = {
        "<s>": tokenizer.bos_token_id, "</s>": tokenizer.eos_token_id,
        "<pad>": tokenizer.pad_token_id, "<unk>": tokenizer.unk_token_id,
    }
    assert len(set(special.values())) == 4
    for token, token_id in special.items():
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    # Special tokens in text stay single tokens, so EOS can be appended as text.
    assert tokenizer("hi</s>").input_ids[-1] == tokenizer.eos_token_id
    assert len(tokenizer) <= 512


def test_tokenizer_training_is_deterministic(record_texts: list[str]) -> None:
    first = build_demo_tokenizer(record_texts, vocab_size=600)
    second = build_demo_tokenizer(record_texts, vocab_size=600)
    assert first.get_vocab() == second.get_vocab()
    assert first(TRICKY_TEXT).input_ids == second(TRICKY_TEXT).input_ids


def test_tokenizer_rejects_tiny_vocab() -> None:
    with pytest.raises(ConfigError, match=r"vocab_size must be >= 260 .*\(got 100\)"):
        build_demo_tokenizer(["abc"], vocab_size=100)


def test_chat_template_uses_neuralchat_format(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "### System:\nBe brief.</s>\n### User:\nAdd 2 and 3.</s>\n"
        "### Assistant:\n2 + 3 = 5.</s>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Add 2 and 3.</s>\n### Assistant:\n")
    with pytest.raises(jinja2.TemplateError, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- model --------------------------------------------------------------------


def test_demo_model_loads_with_auto_classes(demo_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 512
    assert (demo_dir / "model.safetensors").is_file()
    inputs = tokenizer("Add 17 and 25.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_is_idempotent(demo_dir: Path) -> None:
    weights = demo_dir / "model.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}
    assert build_demo_model(str(demo_dir)) == demo_dir
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before
    assert weights.stat().st_mtime_ns == before["model.safetensors"]


def test_build_is_reproducible(demo_dir: Path, tmp_path: Path) -> None:
    rng_state = torch.get_rng_state()
    other = build_demo_model(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    for name in ("model.safetensors", "tokenizer.json", "config.json", DEMO_MARKER):
        assert (other / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_build_fills_an_empty_existing_dir(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    build_demo_model(target, hidden_size=32, num_layers=1)
    marker = json.loads((target / DEMO_MARKER).read_text())
    assert marker["hidden_size"] == 32 and marker["num_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_build_refuses_foreign_dir(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ConfigError, match="not an lmtune demo model .*refusing to write"):
        build_demo_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert notes.read_text() == "mine"


def test_build_refuses_foreign_marker(tmp_path: Path) -> None:
    (tmp_path / DEMO_MARKER).write_text("not json")
    with pytest.raises(ConfigError, match="no valid lmtune_demo.json"):
        build_demo_model(tmp_path)


def test_build_refuses_file_path(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        build_demo_model(path)


def test_build_refuses_demo_with_other_settings(demo_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_dir, tmp_path / "copy")
    with pytest.raises(ConfigError, match=r"different settings \(seed: built 0, asked 1\)"):
        build_demo_model(copy, seed=1)


def test_build_refuses_incomplete_demo(demo_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_dir, tmp_path / "copy")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing model.safetensors"):
        build_demo_model(copy)


def test_build_rejects_bad_settings(tmp_path: Path) -> None:
    divisible = r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"
    with pytest.raises(ConfigError, match=divisible):
        build_demo_model(tmp_path / "m", num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"hidden_size must be > 0 \(got 0\)"):
        build_demo_model(tmp_path / "m", hidden_size=0)
    assert not list(tmp_path.iterdir())


def test_default_demo_dir_follows_lmtune_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))
    assert default_demo_dir() == tmp_path / "home" / "demo-model-v2"
    monkeypatch.delenv("LMTUNE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_demo_dir() == tmp_path / ".cache" / "lmtune" / "demo-model-v2"


# --- training -----------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    # A 150k-parameter model gains nothing from intra-op threads, and on a busy 2-core
    # runner their spin-waiting made this test ~15x slower (0.8 s vs 12 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_training_on_demo_data_lowers_loss(demo_dir: Path, records: list[dict[str, str]]) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    texts = [
        f"### User:\n{r['instruction']}\n{r['input']}\n### Assistant:\n{r['output']}</s>"
        for r in records
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(30):
        batch = texts[step * 8 : step * 8 + 8]  # 240 distinct records, no repeats
        inputs = tokenizer(batch, padding=True, return_tensors="pt")
        labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.8 * first, losses
