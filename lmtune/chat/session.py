"""``lmtune chat``: talk to a base model plus an lmtune adapter, in the format it was trained on.

Contract: ``ChatSession`` asks the renderer training used for every prompt, so what the model
sees at inference is token for token what it saw in training. A chat-trained model (and any
model without an lmtune run record) gets the conversation so far through
``lmtune.data.chat.render_prompt``, ending with the assistant header. A model trained with
``--task completion``/``code-generation`` (``lmtune_args.json``) gets each message alone in the
Alpaca prompt it was trained on (``lmtune.chat.prompting``); ``--prompt_format`` overrides the
choice. Generation stops at EOS (and at the chat template's end-of-turn token). ``run_chat``
loads everything and runs either one answer (``--prompt``) or an interactive loop with
``/reset`` and ``/exit``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from lmtune.chat.args import ChatArguments
from lmtune.chat.prompting import CHAT, COMPLETION, INSTRUCTION_TASKS, completion_prompt_ids, resolve_prompt_format
from lmtune.data.chat import render_prompt
from lmtune.data.chat_format import (
    END,
    NEURAL_CHAT,
    ChatFormat,
    Message,
    PieceEncoder,
    chat_pieces,
    names_template_file,
    resolve_chat_format,
)
from lmtune.errors import ConfigError, DataFormatError, LmtuneError
from lmtune.evaluate.generation import build_generation_config
from lmtune.model.inference import load_for_use
from lmtune.model.load import is_seq2seq
from lmtune.run_record import read_training_settings
from lmtune.model.context import context_length, fit_to_context

logger = logging.getLogger(__name__)

HELP = "Type a message and press Enter; /reset starts a new conversation, /exit quits."


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   chat_format: ChatFormat | None) -> list[int]:
    """EOS, the model's own end ids, and the special token a chat template closes each answer with."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    model_eos = model.generation_config.eos_token_id
    ids += model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else []
    if chat_format is not None and chat_format.template is not None:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        ends = [piece for piece, kind in chat_pieces(PieceEncoder(tokenizer), probe, chat_format) if kind == END]
        if ends and ends[0] and ends[0][0] in tokenizer.all_special_ids:
            ids.append(ends[0][0])
    return list(dict.fromkeys(ids))


class ChatSession:
    """A conversation with a model: history, prompt rendering and generation.

    Args:
        model: A causal (or seq2seq) LM, possibly a ``PeftModel``.
        tokenizer: Its tokenizer.
        chat_format: The chat format the model was trained with, or None for completion prompts:
            each message alone in the Alpaca prompt (``lmtune.chat.prompting``), no history kept.
        generation: Decoding settings; ``eos_token_id`` lists the stop tokens.
        system: System prompt (chat format only); None keeps the format's default.
        max_prompt_tokens: Prompt budget: older user/assistant pairs are dropped beyond it (chat
            format); a longer completion prompt is refused.

    Raises:
        ConfigError: if a system prompt comes with completion prompts, which have no place for one.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat | None,
                 generation: GenerationConfig, *, system: str | None = None, max_prompt_tokens: int | None = None):
        if chat_format is None and system is not None:  # never drop the user's system prompt unsaid
            raise ConfigError("--system only applies to the chat format: the Alpaca completion prompt has no "
                              "system message. Drop --system, or pass --prompt_format chat.")
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.generation = generation
        self.system = system
        self.max_prompt_tokens = max_prompt_tokens
        self.history: list[Message] = []
        self._encoder = PieceEncoder(tokenizer)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = []

    def messages_with(self, user_text: str) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.history + [{"role": "user", "content": user_text}]

    @property
    def prompt_format(self) -> str:
        """``chat`` or ``completion``."""
        return COMPLETION if self.chat_format is None else CHAT

    def describe(self) -> str:
        """How messages reach the model, for the session banner."""
        if self.chat_format is None:
            return ("completion prompts: each message is answered on its own, as the instruction of the Alpaca "
                    "prompt --task completion trains on; earlier turns are not shown to the model")
        return f"format {self.chat_format.name}"

    def prompt_ids(self, user_text: str) -> list[int]:
        """The token ids the model is given to answer ``user_text`` (after the history, in the chat format)."""
        if self.chat_format is None:  # completion training never showed the model a conversation
            return completion_prompt_ids(self.tokenizer, user_text, seq2seq=is_seq2seq(self.model.config),
                                         max_prompt_tokens=self.max_prompt_tokens)
        self._encoder.clear()
        try:
            return render_prompt(self.tokenizer, self.messages_with(user_text), self.chat_format,
                                 max_prompt_tokens=self.max_prompt_tokens, encoder=self._encoder)
        except DataFormatError:
            if self.system is not None or not self.chat_format.default_system:
                raise
            # A small model's context can be mostly taken by the format's default system prompt, so that
            # a one-word message would be "too long": the user's words count more than the default.
            logger.warning("the chat format's default system prompt leaves no room for the message in the "
                           "%s-token prompt budget; continuing without it (--system sets one).", self.max_prompt_tokens)
            self.system = ""
            return self.prompt_ids(user_text)

    def reply(self, user_text: str, streamer: TextStreamer | None = None) -> str:
        """Answer ``user_text``, add both turns to the history (chat format), and return the answer text."""
        ids = self.prompt_ids(user_text)
        inputs = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=self.generation,
                streamer=streamer,
            )
        # A decoder-only model returns the prompt first; a seq2seq one its decoder start token.
        new = output[0, 1:] if is_seq2seq(self.model.config) else output[0, inputs.shape[1]:]
        tokens = new.tolist()
        stops = set(self.generation.eos_token_id)
        end = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
        answer = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if self.chat_format is not None:  # completion prompts never show the history, so none is kept
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def load_chat_model(args: ChatArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model, the adapter on top, and the tokenizer (the adapter's copy when it has one).

    Raises:
        ConfigError: if the model or the adapter cannot be loaded.
    """
    return load_for_use(args.model_name_or_path, args.adapter, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)


def session_prompt_format(args: ChatArguments, trained: dict[str, Any]) -> str:
    """``chat`` or ``completion``: ``--prompt_format``, or for ``auto`` what the run's ``--task`` implies.

    Args:
        args: The ``lmtune chat`` flags.
        trained: ``read_training_settings`` of the run ({} for a model lmtune did not train).

    Raises:
        ConfigError: if chat-format flags (--system, --chat_template) come with completion prompts.
    """
    task = trained.get("task")
    prompt_format = resolve_prompt_format(args.prompt_format, task)
    chat_only = [flag for flag, value in (("--system", args.system), ("--chat_template", args.chat_template))
                 if value is not None]
    if prompt_format == COMPLETION and chat_only:  # refused, never silently ignored
        flags = " and ".join(chat_only)
        why = f"the model was trained with --task {task}" if args.prompt_format == "auto" else (
            "--prompt_format completion")
        raise ConfigError(
            f"{flags} {'applies' if len(chat_only) == 1 else 'apply'} only to the chat format, but each message "
            f"goes to the model alone in the Alpaca completion prompt ({why}). Drop {flags}, or pass "
            "--prompt_format chat to chat in a chat format anyway."
        )
    return prompt_format


def choose_chat_format(args: ChatArguments, tokenizer: PreTrainedTokenizerBase, trained: dict[str, Any]
                       ) -> ChatFormat | None:
    """The chat format to prompt in, or None for completion prompts (see ``session_prompt_format``).

    Args:
        args: The ``lmtune chat`` flags.
        tokenizer: The model's tokenizer (for ``--chat_template tokenizer``).
        trained: ``read_training_settings`` of the run ({} for a model lmtune did not train).

    Raises:
        ConfigError: if chat-format flags come with completion prompts, or the chat template is unusable.
    """
    task = trained.get("task")
    if session_prompt_format(args, trained) == COMPLETION:
        if task not in (None, *INSTRUCTION_TASKS):
            logger.warning("--prompt_format completion: the model was trained with --task %s, not on completion "
                           "prompts; its answers may make little sense.", task)
        return None
    if task not in (None, "chat"):
        reason = "as --prompt_format chat asks" if args.prompt_format == "chat" else "anyway"
        logger.info("the model was trained with --task %s; chatting in the chat format %s.", task, reason)
    trained_template = trained.get("chat_template") or NEURAL_CHAT
    if args.chat_template and task == "chat" and args.chat_template != trained_template:
        logger.warning("--chat_template %s differs from the format the adapter was trained with (%s).",
                       args.chat_template, trained_template)
    return resolve_chat_format(args.chat_template or _trained_template(trained, tokenizer), tokenizer)


def _trained_template(trained: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The recorded ``--chat_template``; for a Jinja file that has since moved, the copy that
    training saved into the run's tokenizer (``finetuning.py``), which is the same template."""
    recorded = trained.get("chat_template")
    if not names_template_file(recorded) or Path(recorded).is_file():
        return recorded
    return "tokenizer" if tokenizer.chat_template else recorded


def generation_budget(config, max_new_tokens: int, max_prompt_tokens: int | None) -> tuple[int, int | None]:
    """New tokens and prompt budget that fit the model's context together; unless ``--max_prompt_tokens``
    says otherwise, the prompt keeps at least half of the context."""
    context = context_length(config)
    if context is None:
        return max_new_tokens, max_prompt_tokens
    if max_prompt_tokens is not None:
        prompt = fit_to_context(max_prompt_tokens, config, "--max_prompt_tokens")
        return max(1, min(max_new_tokens, context - prompt)), prompt
    if max_new_tokens > context // 2:
        logger.warning("--max_new_tokens %d would leave the prompt too little of the model's context of %d "
                       "positions; generating at most %d tokens.", max_new_tokens, context, context // 2)
        max_new_tokens = context // 2
    return max_new_tokens, context - max_new_tokens


def build_session(args: ChatArguments, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> ChatSession:
    """A session with the prompt format, stop tokens and prompt budget the arguments and the run imply.

    Raises:
        ConfigError: for flags that contradict the prompt format, or an unusable chat template.
    """
    trained = read_training_settings(args.adapter or args.model_name_or_path)
    chat_format = choose_chat_format(args, tokenizer, trained)
    max_new_tokens, budget = generation_budget(model.config, args.max_new_tokens, args.max_prompt_tokens)
    generation = build_generation_config(
        model, tokenizer.pad_token_id, max_new_tokens=max_new_tokens, num_beams=1, do_sample=args.do_sample,
        temperature=args.temperature, top_p=args.top_p, num_return_sequences=1,
    )
    generation.eos_token_id = stop_token_ids(model, tokenizer, chat_format)
    return ChatSession(model, tokenizer, chat_format, generation, system=args.system, max_prompt_tokens=budget)


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """Read messages until ``/exit`` or end of input, streaming each answer as it is generated."""
    out = out or sys.stdout
    print(HELP, file=out)
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=out)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}. {HELP}", file=out)
            continue
        try:
            session.reply(text, streamer=TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True))
        except LmtuneError as err:  # e.g. a message too long for the prompt budget: say so and go on
            print(f"lmtune: error: {err}", file=out)


def run_chat(args: ChatArguments) -> int:
    """``lmtune chat``: answer ``--prompt`` once, or chat interactively. Returns the exit code."""
    session_prompt_format(args, read_training_settings(args.adapter or args.model_name_or_path))  # before loading
    model, tokenizer = load_chat_model(args)
    session = build_session(args, model, tokenizer)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.prompt is not None:
        session.reply(args.prompt, streamer=streamer)
        return 0
    adapter = f" + {args.adapter}" if args.adapter else ""
    print(f"lmtune chat: {args.model_name_or_path}{adapter}, {session.describe()}.")
    chat_loop(session)
    return 0
