"""lmtune serve: the official openai client against a server on a free loopback port, a tiny model, two adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import torch
import pytest

openai = pytest.importorskip("openai", reason="the serve tests drive the server with the openai client (pip install openai)")
for _module in ("fastapi", "uvicorn", "sse_starlette"):
    pytest.importorskip(_module, reason="lmtune serve needs its extra: pip install lmtune[serve]")

from conftest import PROJECT_ROOT, write_jsonl  # noqa: E402
from serve_helpers import running_server, serve_argv, served_adapters  # noqa: E402

from lmtune.chat.args import ChatArguments  # noqa: E402
from lmtune.chat.session import build_session, load_chat_model  # noqa: E402
from lmtune.cli import main  # noqa: E402
from lmtune.data.prepare import RenderSettings, prepare_data  # noqa: E402
from lmtune.errors import ConfigError  # noqa: E402
from lmtune.serve import worker as worker_module  # noqa: E402
from lmtune.serve.args import parse_serve_args  # noqa: E402
from lmtune.serve.decoding import IncrementalText  # noqa: E402
from lmtune.serve.models import load_catalog  # noqa: E402
from lmtune.serve.server import bind  # noqa: E402

KEY = "test-key"
CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return served_adapters(tiny_llama_dir, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    argv = serve_argv(tiny_llama_dir, adapters, "--api_key", KEY, "--max_new_tokens", "8", "--max_tokens_limit", "64",
                      "--max_prompt_tokens", "300", "--max_queue", "2")
    with running_server(parse_serve_args(argv)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**headers, "Content-Type": "application/json"}, **kwargs)


def test_models_are_the_base_and_each_adapter(server, client, tiny_llama_dir):
    base = tiny_llama_dir.name
    assert [m.id for m in client.models.list()] == [base, "chatml", "alpaca"]
    listed = post(server, "v1/models", {}).json()["data"]  # POST too, as the reference
    assert [(m["id"], m["parent"]) for m in listed] == [(base, None), ("chatml", base), ("alpaca", base)]
    assert httpx.get(server.url + "health").json() == {"status": "ok", "models": [base, "chatml", "alpaca"]}


@pytest.mark.parametrize("model", ["chatml", "alpaca", "base"])
def test_chat_stream_equals_answer_and_lmtune_chat(server, client, tiny_llama_dir, adapters, model, capsys):
    name = tiny_llama_dir.name if model == "base" else model
    message = "Give three tips for staying healthy."
    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": message}],
                                            temperature=0, max_tokens=12)
    text = answer.choices[0].message.content
    assert text and answer.choices[0].finish_reason in ("stop", "length")
    prompt = server.catalog.chat_prompt_ids(server.catalog.get(name), [{"role": "user", "content": message}])
    assert answer.usage.prompt_tokens == len(prompt) and answer.model == name
    assert answer.usage.total_tokens == len(prompt) + answer.usage.completion_tokens
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": message}],
                                                 temperature=0, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--prompt", message, "--max_new_tokens", "12"]
    capsys.readouterr()
    assert main(["chat", *argv, *(["--adapter", str(adapters[model])] if model != "base" else [])]) == 0
    assert capsys.readouterr().out == text + "\n"  # lmtune chat --prompt, greedy: the same answer


def test_conversation_matches_chat_session_and_seeded_sampling_repeats(server, client, tiny_llama_dir, adapters):
    conversation = CONVERSATION[:4]
    answer = client.chat.completions.create(model="chatml", messages=conversation, temperature=0, max_tokens=10)
    args = ChatArguments(model_name_or_path=str(tiny_llama_dir), adapter=str(adapters["chatml"]),
                         system="Be brief.", max_new_tokens=10)
    session = build_session(args, *load_chat_model(args))
    session.history = conversation[1:3]
    assert answer.choices[0].message.content == session.reply(conversation[3]["content"])
    sampled = dict(model="chatml", messages=conversation, temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    first = client.chat.completions.create(**sampled).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**sampled, stream=True))
    assert streamed == first == client.chat.completions.create(**sampled).choices[0].message.content


def test_served_prompt_is_the_training_rendering_minus_the_answer(server, tiny_llama_dir, adapters, tmp_path):
    tokenizer = server.catalog.tokenizer
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    template = json.loads((adapters["chatml"] / "lmtune_args.json").read_text())["args"]["finetune"]["chat_template"]
    trained = prepare_data(tokenizer, task="chat", train_file=str(data), settings=RenderSettings(
        max_seq_length=512, chat_template=template)).train[0]["input_ids"]
    served = server.catalog.chat_prompt_ids(server.catalog.get("chatml"), CONVERSATION[:-1])
    assert trained[: len(served)] == served
    answer = tokenizer("You are welcome.", add_special_tokens=False).input_ids
    assert tokenizer.decode(trained[len(served):]).startswith(tokenizer.decode(answer))
    assert tokenizer.decode(served).endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a fruit.", "input": "", "output": "Apple."}])
    trained = prepare_data(tokenizer, task="completion", train_file=str(alpaca),
                           settings=RenderSettings(max_seq_length=512)).train[0]["input_ids"]
    served = server.catalog.chat_prompt_ids(server.catalog.get("alpaca"), [{"role": "user", "content": "Name a fruit."}])
    assert trained[: len(served)] == served and tokenizer.decode(served).endswith("### Response:\n")


def test_completions_stream_stop_strings_and_usage(server, client):
    prompt = "Once upon a time"
    answer = client.completions.create(model="alpaca", prompt=prompt, temperature=0, max_tokens=20)
    text = answer.choices[0].text
    assert len(text) >= 5 and answer.choices[0].finish_reason in ("stop", "length")
    assert (answer.usage.completion_tokens == 20) == (answer.choices[0].finish_reason == "length")
    assert answer.usage.prompt_tokens == len(server.catalog.tokenizer(prompt).input_ids)
    streamed = client.completions.create(model="alpaca", prompt=prompt, temperature=0, max_tokens=20, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    stopped = client.completions.create(model="alpaca", prompt=prompt, temperature=0, max_tokens=20, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="alpaca", prompt=prompt, temperature=0, max_tokens=20, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_incremental_text_keeps_every_character(tokenizer):
    text = "Héllo wörld 😀\n\n  two  spaces\tand 日本語 end"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = IncrementalText(tokenizer)
    pieces = [decoder.add(token) for token in ids] + [decoder.finish()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert "\ufffd" not in "".join(pieces[:-1])  # a character split over tokens is sent whole
    decoder = IncrementalText(tokenizer, stop=["wörld"])
    pieces = [decoder.add(token) for token in ids] + [decoder.finish()]
    assert "".join(pieces) == "Héllo " and decoder.stopped


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body["message"]


def test_error_statuses_and_messages(server):
    hello = [{"role": "user", "content": "Hi"}]
    assert "not valid JSON" in error_of(post(server, "v1/chat/completions", "{bad json"), 400)
    assert "temperature: Input should be less than or equal to 2" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": hello, "temperature": 5}), 400)
    assert "messages.0.role: Input should be 'system', 'user' or 'assistant'" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": [{"role": "bot", "content": "x"}]}), 400)
    assert "n: lmtune serve generates one answer per request (got n=2)" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": hello, "n": 2}), 400)
    assert "max_tokens: 65 is more than this server allows (64, --max_tokens_limit)" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": hello, "max_tokens": 65}), 400)
    assert "logprobs: not supported by lmtune serve" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": hello, "logprobs": True}), 400)
    assert "must end with a user message to answer" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": CONVERSATION}), 400)
    assert "Missing API key" in error_of(post(server, "v1/chat/completions", {"messages": hello}, key=None), 401)
    assert "Incorrect API key" in error_of(post(server, "v1/completions", {"prompt": "x"}, key="wrong"), 401)
    assert "The model 'gpt-4' does not exist here; this server offers: " in error_of(
        post(server, "v1/chat/completions", {"model": "gpt-4", "messages": hello}), 404)
    assert "GET /v2/nothing: Not Found" in error_of(httpx.get(server.url + "v2/nothing"), 404)
    long = [{"role": "user", "content": "word " * 400}]
    assert "more than the 300 this server accepts (--max_prompt_tokens)" in error_of(
        post(server, "v1/chat/completions", {"model": "chatml", "messages": long}), 413)
    # The server serves on after all of that.
    assert post(server, "v1/chat/completions", {"model": "chatml", "messages": hello, "max_tokens": 2}).status_code == 200


def test_full_queue_is_503_and_client_disconnect_cancels(server, monkeypatch):
    finished = []
    real_generate = server.worker._generate
    release = __import__("threading").Event()

    def recording(job):
        release.wait(30)
        finish = real_generate(job)
        finished.append(finish)
        return finish

    monkeypatch.setattr(server.worker, "_generate", recording)
    hello = {"model": "chatml", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "stream": True}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        streams = [http.stream("POST", server.url + "v1/chat/completions", json=hello) for _ in range(3)]
        responses = [s.__enter__() for s in streams]  # one running (held), two waiting: the queue is full
        assert "2 requests are already waiting (--max_queue)" in error_of(
            post(server, "v1/chat/completions", hello), 503)
        for stream in streams[1:]:
            stream.__exit__(None, None, None)  # these clients go away while waiting
        slow = worker_module._JobStreamer.put
        monkeypatch.setattr(worker_module._JobStreamer, "put", lambda self, value: (time.sleep(0.02), slow(self, value)))
        release.set()
        lines = responses[0].iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # the first chunk arrived
        streams[0].__exit__(None, None, None)  # and this client goes away mid-answer
    deadline = time.monotonic() + 30
    while len(finished) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished[0].finish_reason == "cancelled" and finished[0].completion_tokens < 64
    assert server.worker._queue.empty()  # the two that left while waiting never ran


def test_non_streamed_request_is_cancelled_when_its_client_leaves(server, monkeypatch):
    finished = []
    real_generate = server.worker._generate
    monkeypatch.setattr(server.worker, "_generate", lambda job: finished.append(real_generate(job)) or finished[-1])
    put = worker_module._JobStreamer.put
    monkeypatch.setattr(worker_module._JobStreamer, "put", lambda self, value: (time.sleep(0.05), put(self, value)))
    body = {"model": "chatml", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 30
    while not finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished[0].finish_reason == "cancelled" and finished[0].completion_tokens < 64


def test_address_in_use_and_adapter_named_like_the_base(server, tiny_llama_dir, adapters):
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConfigError, match=rf"--host 127.0.0.1 --port {port}: cannot listen there"):
        bind("127.0.0.1", port)
    args = parse_serve_args(["--model_name_or_path", str(tiny_llama_dir),
                             "--adapter", f"{tiny_llama_dir.name}={adapters['chatml']}"])
    with pytest.raises(ConfigError, match="is the base model's name; give the adapter another name"):
        load_catalog(args)


def test_config_file_takes_reference_keys(tmp_path, monkeypatch, capsys):
    assert main(["serve", "--help"]) == 0 and "--adapter ADAPTER [ADAPTER ...]" in capsys.readouterr().out
    config = tmp_path / "server.yaml"
    config.write_text("host: 0.0.0.0\nport: 8123\nmodel_name_or_path: ./base\npeft_model_path: ./runs/chat\n"
                      "device: cpu\ntasks_list: ['textchat']\nasr:\n  enable: false\n", encoding="utf-8")
    monkeypatch.setenv("LMTUNE_API_KEY", "from-env")
    args = parse_serve_args(["--config", str(config), "--port", "9000"])
    assert (args.host, args.port, args.model_name_or_path, args.device) == ("0.0.0.0", 9000, "./base", "cpu")
    assert args.adapter == ["chat=./runs/chat"] and args.api_key == "from-env"
    config.write_text("hots: 0.0.0.0\nmodel_name_or_path: ./base\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"server.yaml: unknown key hots \(did you mean host\?\)"):
        parse_serve_args(["--config", str(config)])
    config.write_text("model_name_or_path: ./base\ntts:\n  enable: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tts.enable is true, but lmtune serve has no tts plugin"):
        parse_serve_args(["--config", str(config)])
    with pytest.raises(ConfigError, match="--adapter chat: expected NAME=DIR"):
        parse_serve_args(["--model_name_or_path", "m", "--adapter", "chat"])
    with pytest.raises(ConfigError, match=r"unknown flag --prot \(did you mean --port\?\)"):
        parse_serve_args(["--model_name_or_path", "m", "--prot", "1"])
    assert parse_serve_args(["--model_name_or_path", "m"]).host == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_prints_url_and_stops_cleanly(tiny_llama_dir, adapters, stop_signal):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LMTUNE_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "lmtune", "serve", "--model_name_or_path", str(tiny_llama_dir), "--port", "0",
         "--adapter", f"chatml={adapters['chatml']}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=PROJECT_ROOT,
    )
    try:
        line = process.stdout.readline()
        assert "lmtune serve: models" in line, process.stderr.read() if process.poll() is not None else line
        url = line.split("chat page ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "health", timeout=30).json()["status"] == "ok"
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "lmtune serve: stopped." in out


def test_worker_streams_a_seq2seq_model(tokenizer, tmp_path):
    """An encoder-decoder model: generate() streams its decoder start token first, which is not answer text."""
    import asyncio

    from transformers import T5Config, T5ForConditionalGeneration

    from lmtune.evaluate.generation import build_generation_config
    from lmtune.serve.worker import Finish, GenerationRequest, GenerationWorker

    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    generation = build_generation_config(model, tokenizer.pad_token_id, max_new_tokens=6, num_beams=1,
                                         do_sample=False, temperature=None, top_p=None, num_return_sequences=1)
    worker = GenerationWorker(model, tokenizer, max_queue=2)

    async def run() -> tuple[str, Finish]:
        ids = tokenizer("Hello there").input_ids
        job = worker.submit(GenerationRequest(ids, None, generation, (tokenizer.eos_token_id,)),
                            asyncio.get_running_loop())
        pieces = []
        while isinstance(event := await job.events.get(), str):
            pieces.append(event)
        return "".join(pieces), event

    try:
        text, finish = asyncio.run(run())
    finally:
        worker.stop()
    expected = model.generate(input_ids=torch.tensor([tokenizer("Hello there").input_ids]), generation_config=generation)
    tokens = [t for t in expected[0, 1:].tolist() if t != tokenizer.eos_token_id]
    assert tokens and text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert finish.completion_tokens == expected.shape[1] - 1
