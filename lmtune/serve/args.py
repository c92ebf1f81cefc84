"""Flags of ``lmtune serve`` and its ``--config server.yaml``, which also takes the reference's server keys.

Example::

    lmtune serve --model_name_or_path ./base --adapter chat=./out --port 8000

Contract: flags parse into ``ServeArguments`` (``HfArgumentParser``; unknown flags raise with
a did-you-mean). ``--config FILE`` (YAML or JSON) gives defaults that flags on the command line
override; its keys are the flag names plus NeuralChat's ``neuralchat.yaml`` keys
(``peft_model_path`` becomes ``--adapter``, ``tasks_list`` must ask for ``textchat`` only, and the
speech/retrieval plugin sections are accepted only when disabled). An unknown key is an error
naming the file, with a did-you-mean.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


from lmtune.argv import config_to_argv
from lmtune.command_flags import parse_command_flags, unknown_name_problem
from lmtune.errors import ConfigError

API_KEY_ENV = "LMTUNE_API_KEY"
# neuralchat.yaml plugin sections: lmtune serves text chat only, so each must be absent or disabled.
REFERENCE_PLUGINS = ("asr", "tts", "asr_chinese", "tts_chinese", "retrieval", "cache", "safety_checker",
                     "ner", "ner_int", "face_animation", "image2image")


@dataclass
class ServeArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model directory or hub id."})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=DIR: an adapter written by lmtune finetune, served as model NAME on the one base "
                  "(repeat for several). The base itself is served under its directory name.",
                  "action": "extend"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 opens it to the network)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)."})
    api_key: str | None = field(
        default=None, metadata={"help": f"Require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV})."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat format for every model (default: each one's training format)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "New tokens when a request gives no max_tokens."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest prompt accepted, in tokens (default: the model's context minus "
                  "--max_tokens_limit); longer ones get status 413."},
    )
    max_queue: int = field(default=16, metadata={"help": "Requests waiting for the model; more get status 503."})
    device: Literal["auto", "cpu", "cuda", "xpu", "hpu"] = field(
        default="auto", metadata={"help": "Device: auto picks cuda, then xpu, then cpu."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Weights dtype."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from its repository."})
    cors_origins: list[str] = field(
        default_factory=list, metadata={"help": "Browser origins allowed to call the API from other pages."}
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_tokens_limit", "max_queue"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0 (got {getattr(self, name)})")
        if self.max_new_tokens > self.max_tokens_limit:
            raise ConfigError(f"--max_new_tokens {self.max_new_tokens} is above --max_tokens_limit "
                              f"{self.max_tokens_limit}; raise the limit or lower the default.")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ConfigError(f"--max_prompt_tokens must be > 0 (got {self.max_prompt_tokens})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535 (got {self.port})")


def adapter_dirs(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` items as an ordered mapping.

    Raises:
        ConfigError: an item without ``=``, an empty name or directory, or a name given twice.
    """
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec}: expected NAME=DIR, e.g. --adapter chat=./out")
        if name in named:
            raise ConfigError(f"--adapter {spec}: the name {name} is given twice; names pick the model per request.")
        named[name] = path
    return named


def _reference_keys(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Rewrite NeuralChat's server keys into flags, refusing what lmtune serve does not do."""
    config = dict(config)
    tasks = config.pop("tasks_list", None)
    if tasks is not None and [t for t in ([tasks] if isinstance(tasks, str) else tasks) if t != "textchat"]:
        raise ConfigError(f"{source}: tasks_list {tasks}: lmtune serve offers textchat only; "
                          "set tasks_list: ['textchat'] or remove it.")
    for plugin in REFERENCE_PLUGINS:
        section = config.pop(plugin, None)
        if isinstance(section, dict) and section.get("enable"):
            raise ConfigError(f"{source}: {plugin}.enable is true, but lmtune serve has no {plugin} plugin; "
                              "set enable: false or remove the section.")
    peft = config.pop("peft_model_path", None)
    if peft:
        config["adapter"] = [*config.get("adapter", []), f"{Path(str(peft)).name}={peft}"]
    return config


def load_serve_config(path: str) -> list[str]:
    """The settings of a server YAML/JSON file as argv pieces, to go before the command line's flags.

    Raises:
        ConfigError: an unreadable file, a key that is neither a flag nor a reference key, or an
            enabled reference plugin.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        import yaml

        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text) or {}
    except Exception as err:  # yaml and json raise different types; both mean "not parseable"
        raise ConfigError(f"--config {path}: not valid YAML or JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}.")
    data = _reference_keys(data, path)
    known = [f.name for f in fields(ServeArguments)]
    unknown = [unknown_name_problem(str(key), known, "key") for key in data if key not in known]
    if unknown:
        raise ConfigError(f"--config {path}: " + "; ".join(unknown) + f". Known keys: {', '.join(known)}, and "
                          "the reference's peft_model_path, tasks_list and disabled plugin sections.")
    return config_to_argv(data, source=path)


def parse_serve_args(argv: list[str]) -> ServeArguments:
    """Parse ``lmtune serve`` flags, after the settings of ``--config FILE`` when given.

    Raises:
        ConfigError: unknown flags or keys (with a did-you-mean), bad values, a missing model,
            or malformed ``--adapter`` items.
    """
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path: --config server.yaml")
        argv = load_serve_config(argv[i + 1]) + argv[:i] + argv[i + 2:]
    args = parse_command_flags(ServeArguments, argv, "lmtune serve")
    if not args.model_name_or_path:
        raise ConfigError("--model_name_or_path is required: the base model to serve (adapters go on top).")
    adapter_dirs(args.adapter)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    return args
