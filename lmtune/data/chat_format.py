"""Chat formats: how one conversation becomes token ids, for training and inference alike.

Contract: ``chat_pieces(encoder, messages, chat_format)`` returns the conversation as a list of
``(token ids, kind)`` pieces, kind being ``prompt`` (never supervised), ``answer`` (an assistant
message's text) or ``end`` (the end-of-turn tokens after it, supervised and kept when an answer
is cut). With ``add_generation_prompt=True`` it ends with the assistant header instead, which is
what ``lmtune chat`` feeds the model, so training and inference cannot drift apart.

Ids are built by concatenating pieces tokenized one by one and the EOS id, never by splitting
rendered text with regexes (the reference's regex broke EOS strings like ``<|endoftext|>``).
Each piece is tokenized as it reads in context (``PieceEncoder``), so for byte-level BPE and
SentencePiece tokenizers the result equals tokenizing the whole rendered text at once, without
the stray ``▁`` the reference's per-turn tokenization added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
from transformers import PreTrainedTokenizerBase

from lmtune.data.render import ANSWER, END, PROMPT
from lmtune.errors import ConfigError, DataFormatError

Message = dict[str, str]
EncodedPiece = tuple[list[int], str]  # a segment of token ids (lmtune.data.render.Segment)

NEURAL_CHAT = "neural-chat"
# The reference's default system prompt, without the 4-space indentation its triple-quoted
# string leaked into every training sample (reference-internals §3.3).
NEURAL_CHAT_SYSTEM_PROMPT = (
    "- You are a helpful assistant chatbot trained by Intel.\n"
    "- You answer questions.\n"
    "- You are excited to be able to help the user, but will refuse to do anything that could be considered "
    "harmful to the user.\n"
    "- You are more than just an information source, you are also able to write poetry, short stories, "
    "and make jokes."
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: NeuralChat's ``### System/User/Assistant`` (``template`` None) or a Jinja template.

    Attributes:
        name: ``neural-chat``, ``tokenizer`` or the template file path (for messages and run records).
        template: Jinja source rendered by ``tokenizer.apply_chat_template``; None for NeuralChat's.
        default_system: System prompt used when a conversation has none (NeuralChat's format only).
    """

    name: str
    template: str | None = None
    default_system: str = NEURAL_CHAT_SYSTEM_PROMPT


def names_template_file(chat_template: str | None) -> bool:
    """Whether ``--chat_template`` names a Jinja file rather than ``neural-chat`` or ``tokenizer``."""
    return chat_template not in (None, "", NEURAL_CHAT, "tokenizer")


def resolve_chat_format(chat_template: str | None, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """Turn ``--chat_template`` into a format: ``neural-chat`` (default), ``tokenizer``, or a Jinja file.

    Raises:
        ConfigError: if the tokenizer has no template, or the path is not a readable file.
    """
    if chat_template in (None, "", NEURAL_CHAT):
        return ChatFormat(NEURAL_CHAT)
    if chat_template == "tokenizer":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one is the chat template
            template = template.get("default")
        if not template:
            raise ConfigError(
                f"--chat_template tokenizer: the tokenizer ({tokenizer.name_or_path or 'given'}) has no chat "
                f"template; use --chat_template {NEURAL_CHAT} or the path of a Jinja template file."
            )
        return ChatFormat("tokenizer", template)
    path = Path(chat_template)
    if not path.is_file():
        raise ConfigError(
            f"--chat_template {chat_template}: no such file; allowed: {NEURAL_CHAT} (default), tokenizer, "
            "or the path of a Jinja chat template file."
        )
    return ChatFormat(str(path), path.read_text(encoding="utf-8"))


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when encoding with special tokens starts with BOS (LLaMA, Mistral; not GPT-2/NeoX)."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


class PieceEncoder:
    """Tokenizes conversation pieces as they read in the middle of a text, with a small cache.

    SentencePiece tokenizers put a word-start marker before every text they encode, so a piece
    tokenized alone gets a ``▁`` it would not have in context. Pieces after the first are
    therefore encoded behind a newline, whose tokens are then removed again; when the newline
    merges with the piece (some BPE vocabularies have ``\\n\\n``), the piece is encoded alone.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
        self.eos = tokenizer.eos_token_id
        self._newline = tokenizer.encode("\n", add_special_tokens=False)
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def encode(self, text: str, *, first: bool) -> list[int]:
        """Token ids of ``text`` at the start of a sequence (``first``) or after earlier text."""
        key = (text, first)
        if key not in self._cache:
            ids = None
            if not first:
                behind = self.tokenizer.encode("\n" + text, add_special_tokens=False)
                if behind[: len(self._newline)] == self._newline:
                    ids = behind[len(self._newline):]
            self._cache[key] = ids if ids is not None else self.tokenizer.encode(text, add_special_tokens=False)
        return self._cache[key]


def _neural_chat_texts(messages: list[Message], chat_format: ChatFormat, add_generation_prompt: bool
                       ) -> list[tuple[str | None, str]]:
    """NeuralChat's format as (text, kind) pieces, None standing for the EOS token.

    ``### System:\\n{system}{eos}\\n### User:\\n{user}{eos}\\n### Assistant:\\n{answer}{eos}\\n...``:
    exactly one EOS per turn; the newline after an EOS opens the next piece.
    """
    has_system = messages[0]["role"] == "system"
    system = messages[0]["content"] if has_system else chat_format.default_system
    texts: list[tuple[str | None, str]] = [(f"### System:\n{system}", PROMPT), (None, PROMPT)]
    for message in messages[1:] if has_system else messages:
        if message["role"] == "user":
            texts += [(f"\n### User:\n{message['content']}", PROMPT), (None, PROMPT)]
        else:
            texts += [("\n### Assistant:\n", PROMPT), (message["content"], ANSWER), (None, END)]
    if add_generation_prompt:
        texts.append(("\n### Assistant:\n", PROMPT))
    return texts


def _render_template(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[Message],
                     add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as err:
        raise DataFormatError(f"the chat template cannot render this conversation: {err}") from err


def _split_answer(span: str, content: str) -> tuple[str, str]:
    """Split an assistant span into its text and the end-of-turn markup the template put after it."""
    stripped = content.strip()
    at = span.rfind(stripped) if stripped else -1
    return (span, "") if at < 0 else (span[: at + len(stripped)], span[at + len(stripped):])


def _template_texts(tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_format: ChatFormat,
                    add_generation_prompt: bool) -> list[tuple[str | None, str]]:
    """A Jinja template's rendering cut into pieces at the assistant spans.

    Assistant turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[:i+1])``; both must be prefixes of the whole rendering.

    Raises:
        ConfigError: if the template does not render conversations incrementally.
    """
    template = chat_format.template
    full = _render_template(tokenizer, template, messages, add_generation_prompt)
    texts: list[tuple[str | None, str]] = []
    done = 0
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render_template(tokenizer, template, messages[:number], True)
        stop = _render_template(tokenizer, template, messages[: number + 1], False)
        if not (stop.startswith(start) and full.startswith(stop) and len(start) >= done):
            raise ConfigError(
                f"--chat_template {chat_format.name}: the template does not render conversations "
                f"incrementally (the prompt of assistant message {number} is not a prefix of the whole "
                "conversation), so the assistant spans cannot be found; use a template that appends turns."
            )
        answer, end = _split_answer(stop[len(start):], message["content"])
        texts += [(full[done: len(start)], PROMPT), (answer, ANSWER), (end, END)]
        done = len(stop)
    texts.append((full[done:], PROMPT))
    return texts


def chat_pieces(
    encoder: PieceEncoder, messages: list[Message], chat_format: ChatFormat, *, add_generation_prompt: bool = False
) -> list[EncodedPiece]:
    """Render a checked conversation as ``(token ids, kind)`` pieces; see the module docstring.

    NeuralChat's format starts with BOS when the tokenizer adds one; a Jinja template writes
    its own BOS, as with ``apply_chat_template``.

    Raises:
        DataFormatError: if the tokenizer has no EOS (NeuralChat) or the template rejects the conversation.
        ConfigError: if the template does not render incrementally.
    """
    if chat_format.template is None:
        if encoder.eos is None:
            raise DataFormatError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json.")
        texts = _neural_chat_texts(messages, chat_format, add_generation_prompt)
        pieces: list[EncodedPiece] = [(list(encoder.bos), PROMPT)] if encoder.bos else []
    else:
        texts = _template_texts(encoder.tokenizer, messages, chat_format, add_generation_prompt)
        pieces = []
    first = True
    for text, kind in texts:
        if text is None:
            pieces.append(([encoder.eos], kind))
        elif text:
            pieces.append((encoder.encode(text, first=first), kind))
        else:
            continue
        first = False
    return pieces
