"""The models a server offers (the base and each adapter, by name) and their prompts.

Contract: ``load_catalog`` loads the base and every ``--adapter NAME=DIR`` onto it through the
loader ``lmtune chat``, ``eval`` and ``merge`` use (``lmtune.model.inference``), and gives each
served model the prompt format, the stop tokens and the prompt rendering of ``lmtune chat``:
the chat format its run recorded (``lmtune_args.json``), or the Alpaca completion prompt for a
model trained with ``--task completion``/``code-generation``. Rendering calls the training
renderers themselves (``lmtune.data.chat.render_prompt``, ``lmtune.chat.prompting``), so a served
prompt is token for token what training put before the answer. Prompts are never cut to fit:
one above the limit is refused (the server answers 413).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.chat.args import ChatArguments
from lmtune.chat.prompting import completion_prompt_ids
from lmtune.chat.session import choose_chat_format, stop_token_ids
from lmtune.data.chat import render_prompt
from lmtune.data.chat_format import ChatFormat, Message
from lmtune.errors import ConfigError, DataFormatError, LmtuneError
from lmtune.model.inference import load_for_use
from lmtune.model.load import is_seq2seq
from lmtune.run_record import read_training_settings
from lmtune.serve.args import ServeArguments, adapter_dirs


class UnknownModel(LmtuneError):
    """A request named a model the server does not offer."""


class PromptTooLong(LmtuneError):
    """A prompt longer than ``--max_prompt_tokens``."""


@dataclass(frozen=True)
class ServedModel:
    """One model a request can name: the base (``adapter`` None) or an adapter on it."""

    name: str
    adapter: str | None
    source: str
    chat_format: ChatFormat | None  # None: the Alpaca completion prompt, one message at a time
    stop_ids: tuple[int, ...]


class Catalog:
    """The served models by name, the shared tokenizer, and prompt rendering with its limit."""

    def __init__(self, models: list[ServedModel], tokenizer: PreTrainedTokenizerBase, *, seq2seq: bool,
                 max_prompt_tokens: int | None, aliases: dict[str, str] | None = None):
        self.models = {m.name: m for m in models}
        # A request that names no model gets the first adapter (what was fine-tuned), else the base.
        self.default = next((m.name for m in models if m.adapter is not None), models[0].name)
        # Prompts are tokenized here while the worker thread decodes: a fast tokenizer's Rust state
        # must not be used from two threads at once.
        self.tokenizer_lock = threading.Lock()
        self.tokenizer, self.seq2seq = tokenizer, seq2seq
        self.max_prompt_tokens = max_prompt_tokens
        self.aliases = aliases or {}

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (its default when it names none).

        Raises:
            UnknownModel: a name the server does not offer; the message lists the names it does.
        """
        name = name or self.default
        name = self.aliases.get(name, name)
        if name not in self.models:
            raise UnknownModel(f"The model '{name}' does not exist here; this server offers: "
                               f"{', '.join(self.models)}.")
        return self.models[name]

    def _checked(self, ids: list[int]) -> list[int]:
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"The prompt is {len(ids)} tokens long, more than the {self.max_prompt_tokens} "
                                "this server accepts (--max_prompt_tokens); shorten the conversation.")
        return ids

    def chat_prompt_ids(self, served: ServedModel, messages: list[Message]) -> list[int]:
        """The ids that ask ``served`` for the next answer, as ``lmtune chat`` and training render them.

        Raises:
            DataFormatError: a malformed conversation, or a system message for a completion-prompt model.
            PromptTooLong: a prompt above the limit.
        """
        if served.chat_format is not None:
            with self.tokenizer_lock:
                return self._checked(render_prompt(self.tokenizer, messages, served.chat_format))
        if any(m["role"] == "system" for m in messages):
            raise DataFormatError(f"model {served.name} was trained on Alpaca completion prompts, which have no "
                                  "system message; drop the system message.")
        if not messages or messages[-1]["role"] != "user":
            raise DataFormatError("messages: the conversation must end with a user message to answer.")
        # As in lmtune chat: completion training never showed the model a conversation, so the
        # last message goes alone into the prompt it was trained on.
        with self.tokenizer_lock:
            ids = completion_prompt_ids(self.tokenizer, messages[-1]["content"], seq2seq=self.seq2seq)
        return self._checked(ids)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        """A raw completion prompt tokenized as is (with the tokenizer's BOS, if it adds one).

        Raises:
            PromptTooLong: a prompt above the limit.
        """
        with self.tokenizer_lock:
            ids = self.tokenizer(prompt).input_ids
        return self._checked(ids)


def base_name(model_name_or_path: str) -> str:
    """The base model's served name: a local directory's name, or the hub id."""
    path = Path(model_name_or_path)
    return path.name if path.exists() and path.name else model_name_or_path


def _served(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: ServeArguments, name: str,
            adapter: str | None, source: str) -> ServedModel:
    # lmtune chat's own choice of prompt format, from the same flags and the run's record.
    chat_args = ChatArguments(model_name_or_path=args.model_name_or_path, adapter=source if adapter else None,
                              chat_template=args.chat_template)
    chat_format = choose_chat_format(chat_args, tokenizer, read_training_settings(source))
    return ServedModel(name, adapter, source, chat_format, tuple(stop_token_ids(model, tokenizer, chat_format)))


def _prompt_limit(model: PreTrainedModel, args: ServeArguments) -> int | None:
    if args.max_prompt_tokens is not None:
        return args.max_prompt_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return None
    return context - args.max_tokens_limit if context > args.max_tokens_limit else context


def load_catalog(args: ServeArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Catalog]:
    """Load the base with every adapter on it, and describe what each served name means.

    Raises:
        ConfigError: an adapter named like the base, an unloadable model or adapter, or an unusable
            chat template.
    """
    adapters = adapter_dirs(args.adapter)
    base = base_name(args.model_name_or_path)
    if base in adapters:
        raise ConfigError(f"--adapter {base}=...: {base} is the base model's name; give the adapter another name.")
    model, tokenizer = load_for_use(args.model_name_or_path, adapters or None, device=args.device,
                                    dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                    adapter_flag="--adapter")
    served = [_served(model, tokenizer, args, base, None, args.model_name_or_path)]
    served += [_served(model, tokenizer, args, name, name, path) for name, path in adapters.items()]
    catalog = Catalog(served, tokenizer, seq2seq=is_seq2seq(model.config), max_prompt_tokens=_prompt_limit(model, args),
                      aliases={args.model_name_or_path: base})
    return model, tokenizer, catalog
