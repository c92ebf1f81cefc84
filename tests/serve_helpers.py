"""Helpers for the lmtune serve tests: adapters with run records, and a server on a free loopback port."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lmtune.run_record import write_run_args
from lmtune.serve.app import ServeLimits, build_app
from lmtune.serve.args import ServeArguments
from lmtune.serve.models import Catalog, load_catalog
from lmtune.serve.server import bind, url_of
from lmtune.serve.worker import GenerationWorker

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_adapter(base_dir: Path, out: Path, *, seed: int, task: str, chat_template: str | None = None) -> Path:
    """A LoRA adapter with random (non-zero) weights and the run record training would write beside it."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    write_run_args(str(out), {"model": {"model_name_or_path": str(base_dir)},
                              "finetune": {"task": task, "chat_template": chat_template}})
    return out


def served_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """Two adapters: 'chatml' trained (as its record says) on a ChatML Jinja template, 'alpaca' on completion."""
    template = root / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    return {
        "chatml": save_adapter(base_dir, root / "chatml", seed=1, task="chat", chat_template=str(template)),
        "alpaca": save_adapter(base_dir, root / "alpaca", seed=2, task="completion"),
    }


def serve_argv(base_dir: Path, adapters: dict[str, Path], *flags: str) -> list[str]:
    """``lmtune serve`` flags for the base and every adapter by name, plus ``flags``."""
    argv = ["--model_name_or_path", str(base_dir), *flags]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv


@dataclass
class RunningServer:
    url: str
    catalog: Catalog
    worker: GenerationWorker
    args: ServeArguments


@contextlib.contextmanager
def running_server(args: ServeArguments) -> Iterator[RunningServer]:
    """The lmtune serve app on 127.0.0.1 (a free port), run by uvicorn in a thread of this process."""
    import uvicorn

    model, tokenizer, catalog = load_catalog(args)
    worker = GenerationWorker(model, tokenizer, args.max_queue, catalog.tokenizer_lock)
    app = build_app(catalog, worker, limits=ServeLimits(args.max_new_tokens, args.max_tokens_limit),
                    api_key=args.api_key, cors_origins=args.cors_origins)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield RunningServer(url_of(sock), catalog, worker, args)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        worker.stop()
        sock.close()
