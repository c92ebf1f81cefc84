"""Request bodies of the OpenAI-compatible API, the errors it answers with, and response shapes.

Contract: pydantic checks every field (a bad one is a 400 naming it); ``APIError`` carries an
HTTP status and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``. Fields
OpenAI defines that lmtune cannot honour (tools, logprobs, penalties, ``n`` above 1, ...) are
refused with a 400 when set, never silently ignored; fields that do not change the answer
(``user``, ``stream_options`` ...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields that do not change what is generated: accepted and not acted on.
HARMLESS_FIELDS = {"user", "stream_options", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Values of unsupported fields that mean "not used", as clients send them by default (best_of 1,
# penalties 0, tool_choice "none"/"auto" without tools).
_UNSET_VALUES = (None, 0, 1, [], {}, "", "none", "auto")


def _unset(value: Any) -> bool:
    if isinstance(value, bool):  # True == 1 in Python: logprobs=True must not pass as "unset"
        return value is False
    return value in _UNSET_VALUES


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Unknown fields are kept so that unsupported ones can be refused by name (unsupported_fields).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 stop strings are allowed (got {len(stop)}).", param="stop")
        return tuple(s for s in stop if s)

    def unsupported_fields(self) -> list[str]:
        extras = self.model_extra or {}
        return sorted(k for k, v in extras.items() if k not in HARMLESS_FIELDS and not _unset(v))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"prompt: give one prompt per request (got a list of {len(self.prompt)}).",
                           param="prompt")
        return self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
               usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **({"usage": usage_counts} if usage_counts is not None else {}),
    }


def completion_response(rid: str, model: str, text: str, finish_reason: str | None,
                        usage_counts: dict[str, int] | None = None, *, chunk: bool = False) -> dict[str, Any]:
    """A ``text_completion`` answer, or one chunk of a streamed one (same shape, as OpenAI does)."""
    body = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_counts is not None or not chunk:
        body["usage"] = usage_counts
    return body
