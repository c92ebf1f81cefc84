"""Flags of ``lmtune chat``, parsed by ``HfArgumentParser`` like the fine-tuning flags.

Example::

    lmtune chat --model_name_or_path ./base --adapter ./out --prompt "What is LoRA?"
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal, get_args


from lmtune.command_flags import parse_command_flags
from lmtune.errors import ConfigError
from lmtune.model.base_model import resolve_base_model

PromptFormat = Literal["auto", "chat", "completion"]


@dataclass
class ChatArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model directory or hub id (default: the one --adapter was trained on)."}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "Adapter directory written by lmtune finetune (PEFT format), loaded on top."}
    )
    prompt: str | None = field(
        default=None, metadata={"help": "Answer this one message, print the answer and exit (for scripts)."}
    )
    system: str | None = field(
        default=None, metadata={"help": "System prompt (default: the chat format's own, none for Jinja templates)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat format: neural-chat, tokenizer, or a Jinja file (default: the one training used)."},
    )
    prompt_format: PromptFormat = field(
        default="auto",
        metadata={"help": "How each message is put to the model: chat (the chat format, with the conversation "
                  "so far), completion (each message alone as the instruction of the Alpaca prompt that --task "
                  "completion/code-generation trains on), or auto: completion for a model trained with those "
                  "tasks (read from its lmtune_args.json), chat otherwise."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Prompt budget; older turns are dropped beyond it (default: the model's context "
                  "minus --max_new_tokens)."},
    )
    device: Literal["auto", "cpu", "cuda", "xpu", "hpu"] = field(
        default="auto", metadata={"help": "Device: auto picks cuda, then xpu, then cpu."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Weights dtype."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model's repository to run."}
    )

    def __post_init__(self) -> None:
        allowed = get_args(PromptFormat)
        if self.prompt_format not in allowed:  # the parser checks its choices; this guards the Python API
            close = difflib.get_close_matches(str(self.prompt_format), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--prompt_format {self.prompt_format} is not allowed{hint}; allowed: "
                              f"{', '.join(allowed)}.")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1] (got {self.top_p})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ConfigError(f"--max_prompt_tokens must be > 0 (got {self.max_prompt_tokens})")


def parse_chat_args(argv: list[str]) -> ChatArguments:
    """Parse ``lmtune chat`` flags.

    Raises:
        ConfigError: for unknown flags (with a did-you-mean), bad values or a missing model.
    """
    args = parse_command_flags(ChatArguments, argv, "lmtune chat")
    args.model_name_or_path = resolve_base_model(args.model_name_or_path, args.adapter, "lmtune chat")
    return args
