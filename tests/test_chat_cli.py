"""``lmtune chat`` and ``--task chat`` end to end: train an adapter, then talk to it in the same format."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from conftest import PROJECT_ROOT, write_jsonl
from lmtune.chat.args import ChatArguments, parse_chat_args
from lmtune.chat.prompting import completion_prompt_ids
from lmtune.chat.session import build_session, chat_loop, choose_chat_format, load_chat_model, read_training_settings
from lmtune.cli import main
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.errors import ConfigError, DataFormatError
from lmtune.run_record import write_run_args

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
INSTRUCTION = "Give three tips for staying healthy."
# Written out here, not imported, so that a change to the training template fails these tests.
ALPACA_PROMPT = (
    "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
    f"\n\n### Instruction:\n{INSTRUCTION}\n\n### Response:\n"
)


class RecordingStreamer(BaseStreamer):
    """Keeps what generate() streams: the prompt first, then each new token."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def put(self, value):
        self.calls.append(value.reshape(-1).tolist())

    def end(self):
        pass


@pytest.fixture(scope="module")
def chat_run(tiny_llama_dir, tmp_path_factory):
    """An adapter trained with --task chat and a Jinja chat template file (5 steps on the tiny model)."""
    from lmtune.finetuning import finetune

    root = tmp_path_factory.mktemp("chat-run")
    template = root / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    data = write_jsonl(root / "chat.jsonl", [{"messages": CONVERSATION}] * 8)
    out = root / "out"
    metrics = finetune(
        model_name_or_path=str(tiny_llama_dir), train_file=str(data), task="chat", chat_template=str(template),
        output_dir=str(out), do_train=True, max_steps=5, per_device_train_batch_size=4, max_seq_length=128,
        max_source_length=96, learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    return out, template, metrics


@pytest.mark.slow
def test_finetune_chat_writes_adapter_and_template(chat_run):
    out, template, metrics = chat_run
    assert metrics["train_samples"] == 8 and metrics["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    saved = json.loads((out / "lmtune_args.json").read_text(encoding="utf-8"))["args"]
    assert saved["finetune"]["task"] == "chat" and saved["finetune"]["chat_template"] == str(template)


@pytest.mark.slow
def test_prompt_answers_once_in_the_trained_format(chat_run, tiny_llama_dir, capsys):
    out, template, _ = chat_run
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--adapter", str(out), "--prompt", "What is 2 plus 2?",
            "--max_new_tokens", "6"]
    assert main(["chat", *argv]) == 0
    printed = capsys.readouterr().out
    args = parse_chat_args(argv)
    session = build_session(args, *load_chat_model(args))
    assert session.chat_format.name == str(template)  # read back from the adapter's lmtune_args.json
    assert session.prompt_format == "chat"
    assert session.tokenizer.decode(session.prompt_ids("What is 2 plus 2?")) == (
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    assert printed == session.reply("What is 2 plus 2?") + "\n"


def test_inference_renders_exactly_what_training_rendered(tokenizer, tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    train_ids = prepare_data(tokenizer, task="chat", train_file=str(data),
                             settings=RenderSettings(max_seq_length=512)).train[0]["input_ids"]
    args = ChatArguments(model_name_or_path=str(tiny_llama_dir), system="Be brief.")
    session = build_session(args, *load_chat_model(args))
    assert session.chat_format.name == "neural-chat"
    session.history = CONVERSATION[1:3]
    prompt = session.prompt_ids("Thanks!")
    assert train_ids[: len(prompt)] == prompt
    answer = tokenizer("You are welcome.", add_special_tokens=False).input_ids
    assert train_ids[len(prompt):] == answer + [tokenizer.eos_token_id]
    assert tokenizer.decode(prompt) == (
        "<s>### System:\nBe brief.</s>\n### User:\nWhat is 2 plus 2?</s>\n### Assistant:\nIt is 4.</s>\n"
        "### User:\nThanks!</s>\n### Assistant:\n")


def _forced_session(tiny_llama_dir, token_id: int, max_new_tokens: int = 5):
    """A session whose model always predicts ``token_id`` (output head = a bias)."""
    args = ChatArguments(model_name_or_path=str(tiny_llama_dir), max_new_tokens=max_new_tokens)
    model, tokenizer = load_chat_model(args)
    head = torch.nn.Linear(model.get_output_embeddings().in_features, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return build_session(args, model, tokenizer)


def test_generation_stops_at_eos_and_history_grows(tokenizer, tiny_llama_dir):
    session = _forced_session(tiny_llama_dir, tokenizer.eos_token_id)
    streamer = RecordingStreamer()
    assert session.reply("Hi", streamer=streamer) == ""
    assert streamer.calls[1:] == [[tokenizer.eos_token_id]]  # one step, then stop
    word = tokenizer.encode("a", add_special_tokens=False)[0]
    session = _forced_session(tiny_llama_dir, word, max_new_tokens=5)
    streamer = RecordingStreamer()
    answer = session.reply("Hi", streamer=streamer)
    assert streamer.calls[1:] == [[word]] * 5 and answer == "aaaaa"
    assert session.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    assert tokenizer.decode(session.prompt_ids("Again")).endswith(
        f"### User:\nHi</s>\n### Assistant:\n{answer}</s>\n### User:\nAgain</s>\n### Assistant:\n")


def test_seq2seq_model_chats(tokenizer, tmp_path):
    """An encoder-decoder model gets the prompt as encoder input and answers from its decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    session = _forced_session(tmp_path, tokenizer.encode("a", add_special_tokens=False)[0], max_new_tokens=3)
    assert session.model.config.is_encoder_decoder and session.reply("Hi") == "aaa"


def test_chat_loop_reset_and_exit(tokenizer, tiny_llama_dir, capsys):
    session = _forced_session(tiny_llama_dir, tokenizer.encode("a", add_special_tokens=False)[0], max_new_tokens=2)
    lines = iter(["Hi", "/reset", "/help", "", "Hello", "/exit", "never read"])
    chat_loop(session, read=lambda prompt: next(lines))
    printed = capsys.readouterr().out
    assert printed.splitlines().count("aa") == 2 and "(new conversation)" in printed
    assert "unknown command /help" in printed
    assert session.history[0] == {"role": "user", "content": "Hello"} and len(session.history) == 2
    assert next(lines) == "never read"


def test_chat_command_errors(tiny_llama_dir, tmp_path, capsys):
    assert main(["chat", "--help"]) == 0 and "--prompt_format {auto,chat,completion}" in capsys.readouterr().out
    assert main(["chat", "--prompt", "hi"]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--max_new_token", "3"]) == 2
    assert "did you mean --max_new_tokens" in capsys.readouterr().err
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--adapter", str(tiny_llama_dir)]) == 2
    assert "no adapter_config.json there; expected an lmtune/PEFT adapter. It holds a whole model" in (
        capsys.readouterr().err)
    with pytest.raises(ConfigError, match=r"--top_p must be in \(0, 1\] \(got 2\.0\)"):
        ChatArguments(model_name_or_path="m", top_p=2.0)


@pytest.mark.slow
def test_multi_turn_session_through_stdin(chat_run, tiny_llama_dir):
    out, _, _ = chat_run
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--adapter", str(out), "--max_new_tokens", "4"]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "lmtune", "chat", *argv], input="Hi\nAnd then?\n/reset\nHi\n/exit\n",
        capture_output=True, text=True, env=env, timeout=300, cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    turns = result.stdout.split(">>> ")
    assert len(turns) == 6 and turns[3] == "(new conversation)\n" and turns[5] == ""
    args = parse_chat_args(argv)
    session = build_session(args, *load_chat_model(args))
    first, second = session.reply("Hi"), session.reply("And then?")  # the second answer sees the first turn
    assert turns[1:3] == [first + "\n", second + "\n"]
    assert turns[4] == turns[1]  # after /reset the same question gets the same (greedy) answer


# ---- --prompt_format: completion-trained models get the Alpaca prompt they were trained on ----


def _run_dir(tiny_llama_dir, tmp_path, task: str | None):
    """The tiny model in a directory that looks like a finished lmtune run trained with ``--task task``."""
    run = tmp_path / f"run-{task}"
    shutil.copytree(tiny_llama_dir, run)
    if task is not None:
        write_run_args(str(run), {"finetune": {"task": task, "chat_template": None}})
    return run


@pytest.mark.parametrize("task, prompt_format", [
    ("completion", "completion"), ("code-generation", "completion"), ("chat", "chat"), ("summarization", "chat"),
    (None, "chat"),
])
def test_auto_prompt_format_follows_the_training_task(tokenizer, tiny_llama_dir, tmp_path, task, prompt_format):
    run = _run_dir(tiny_llama_dir, tmp_path, task)
    chat_format = choose_chat_format(ChatArguments(model_name_or_path=str(run)), tokenizer,
                                     read_training_settings(str(run)))
    assert (chat_format is None) == (prompt_format == "completion")
    if chat_format is not None:
        assert chat_format.name == "neural-chat"


def test_a_checkpoint_is_prompted_as_its_run_was_trained(tiny_llama_dir, tmp_path):
    run = _run_dir(tiny_llama_dir, tmp_path, "completion")
    (run / "checkpoint-2").mkdir()
    assert read_training_settings(str(run / "checkpoint-2")) == {"task": "completion", "chat_template": None}
    assert read_training_settings(str(tmp_path)) == {}


def test_completion_trained_model_gets_exactly_the_training_prompt(tokenizer, tiny_llama_dir, tmp_path):
    args = ChatArguments(model_name_or_path=str(_run_dir(tiny_llama_dir, tmp_path, "completion")), max_new_tokens=3)
    session = build_session(args, *load_chat_model(args))
    assert session.prompt_format == "completion" and session.chat_format is None
    streamer = RecordingStreamer()
    session.reply(INSTRUCTION, streamer=streamer)
    given = streamer.calls[0]  # what generate() was handed
    assert tokenizer.decode(given) == ALPACA_PROMPT
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": INSTRUCTION, "input": "", "output": "Eat well."}])
    train_ids = prepare_data(tokenizer, task="completion", train_file=str(data)).train[0]["input_ids"]
    answer = tokenizer("Eat well.", add_special_tokens=False).input_ids
    assert train_ids == given + answer + [tokenizer.eos_token_id]
    # Each message stands alone: no history is kept or shown.
    assert session.history == [] and session.prompt_ids("Again") == completion_prompt_ids(
        tokenizer, "Again", seq2seq=False)


def test_seq2seq_completion_prompt_is_the_training_encoder_input(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f" {INSTRUCTION} ", "output": "Eat well."}])
    train = prepare_data(tokenizer, task="completion", train_file=str(data), seq2seq=True).train[0]
    ids = completion_prompt_ids(tokenizer, f" {INSTRUCTION} ", seq2seq=True)
    assert ids == train["input_ids"] and tokenizer.decode(ids).endswith(f"{INSTRUCTION}\n\n### Response:")


def test_prompt_format_overrides_the_training_task(tokenizer, tiny_llama_dir, tmp_path, caplog):
    completion_run = _run_dir(tiny_llama_dir, tmp_path, "completion")
    args = ChatArguments(model_name_or_path=str(completion_run), prompt_format="chat", system="Be brief.")
    with caplog.at_level(logging.INFO, logger="lmtune.chat.session"):
        session = build_session(args, *load_chat_model(args))
    assert "trained with --task completion; chatting in the chat format as --prompt_format chat asks" in caplog.text
    assert session.chat_format.name == "neural-chat" and tokenizer.decode(session.prompt_ids(INSTRUCTION)) == (
        f"<s>### System:\nBe brief.</s>\n### User:\n{INSTRUCTION}</s>\n### Assistant:\n")
    chat_run = _run_dir(tiny_llama_dir, tmp_path, "chat")
    args = ChatArguments(model_name_or_path=str(chat_run), prompt_format="completion")
    with caplog.at_level(logging.WARNING, logger="lmtune.chat.session"):
        session = build_session(args, *load_chat_model(args))
    assert "the model was trained with --task chat, not on completion prompts" in caplog.text
    assert tokenizer.decode(session.prompt_ids(INSTRUCTION)) == ALPACA_PROMPT
    args = parse_chat_args(["--model_name_or_path", str(tiny_llama_dir), "--prompt_format", "completion"])
    assert build_session(args, *load_chat_model(args)).prompt_format == "completion"  # no run record needed


def test_prompt_format_errors(tiny_llama_dir, tmp_path, capsys):
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--prompt_format", "alpaca"]) == 2
    assert "--prompt_format/--prompt-format: invalid choice: 'alpaca' (choose from 'auto', 'chat', 'completion')" in (
        capsys.readouterr().err)
    with pytest.raises(ConfigError, match=r"^--prompt_format completon is not allowed \(did you mean completion\?\); "
                                          r"allowed: auto, chat, completion\.$"):
        ChatArguments(model_name_or_path="m", prompt_format="completon")
    record_only = tmp_path / "record-only"  # no weights: the flag conflict is found before any load
    write_run_args(str(record_only), {"finetune": {"task": "completion"}})
    assert main(["chat", "--model_name_or_path", str(record_only), "--system", "Be brief.", "--prompt", "Hi"]) == 2
    assert ("lmtune: error: --system applies only to the chat format, but each message goes to the model alone in "
            "the Alpaca completion prompt (the model was trained with --task completion).") in capsys.readouterr().err
    run = _run_dir(tiny_llama_dir, tmp_path, "completion")
    args = ChatArguments(model_name_or_path=str(run), system="Be brief.", chat_template="neural-chat")
    with pytest.raises(ConfigError, match=r"^--system and --chat_template apply only to the chat format, but each "
                                          r"message goes to the model alone in the Alpaca completion prompt \(the "
                                          r"model was trained with --task completion\)\. Drop --system and "
                                          r"--chat_template, or pass --prompt_format chat"):
        build_session(args, *load_chat_model(args))
    args = ChatArguments(model_name_or_path=str(run), max_prompt_tokens=10)
    session = build_session(args, *load_chat_model(args))
    with pytest.raises(DataFormatError, match=r"^chat: the message makes a \d+-token completion prompt, more than "
                                              r"the 10 allowed \(--max_prompt_tokens\); shorten it\.$"):
        session.reply(INSTRUCTION)


@pytest.fixture(scope="module")
def completion_run(tiny_llama_dir, demo_records, tmp_path_factory):
    """An adapter trained with --task completion on Alpaca records (3 steps on the tiny model)."""
    from lmtune.finetuning import finetune

    root = tmp_path_factory.mktemp("completion-run")
    data = root / "alpaca.json"
    data.write_text(json.dumps(demo_records[:12]), encoding="utf-8")
    out = root / "out"
    finetune(
        model_name_or_path=str(tiny_llama_dir), train_file=str(data), task="completion", output_dir=str(out),
        do_train=True, max_steps=3, per_device_train_batch_size=4, max_seq_length=256, learning_rate=1e-3,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )
    return out


def test_chat_command_with_a_completion_trained_adapter(completion_run, tiny_llama_dir, capsys, monkeypatch):
    """The real ``lmtune chat``: one --prompt answer, then an interactive session where turns are independent."""
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--adapter", str(completion_run), "--max_new_tokens", "5"]
    assert main(["chat", *argv, "--prompt", INSTRUCTION]) == 0
    printed = capsys.readouterr().out
    args = parse_chat_args(argv)
    session = build_session(args, *load_chat_model(args))
    streamer = RecordingStreamer()
    assert printed == session.reply(INSTRUCTION, streamer=streamer) + "\n"
    assert session.prompt_format == "completion" and session.tokenizer.decode(streamer.calls[0]) == ALPACA_PROMPT
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{INSTRUCTION}\nWhat is 2 plus 2?\n{INSTRUCTION}\n/exit\n"))
    assert main(["chat", *argv]) == 0
    banner, *turns = capsys.readouterr().out.split(">>> ")
    assert banner.count("completion prompts: each message is answered on its own") == 1
    assert "earlier turns are not shown to the model" in banner
    assert turns[0] == turns[2] == printed  # the same message, alone each time, gets the same greedy answer
    assert turns[1] == session.reply("What is 2 plus 2?") + "\n" and turns[3] == ""
