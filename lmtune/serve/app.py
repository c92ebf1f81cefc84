"""The FastAPI application: OpenAI-compatible endpoints, the health check and the chat page.

Endpoints: ``GET /`` (chat page), ``GET /health``, ``GET|POST /v1/models``, ``POST
/v1/chat/completions`` and ``POST /v1/completions``, each streamed as server-sent events ending
with ``data: [DONE]`` when ``stream`` is true. Contract: every error is OpenAI's JSON error body
with its status (400 bad JSON or field, 401 API key, 404 model or path, 413 prompt too long,
503 queue full); no input makes the server fail. Generation runs in the one
``GenerationWorker``; a client that disconnects cancels its job (streaming: sse-starlette ends
the generator; otherwise a task waits for the disconnect message while the handler waits).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.errors import DataFormatError
from lmtune.evaluate.generation import build_generation_config
from lmtune.serve.models import Catalog, PromptTooLong, ServedModel, UnknownModel
from lmtune.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _Request,
    chat_chunk,
    chat_response,
    completion_response,
    new_id,
    usage,
)
from lmtune.serve.worker import Finish, GenerationRequest, GenerationWorker, Job, Overloaded

STATIC = resources.files("lmtune.serve") / "static"


class ServeLimits:
    """The per-request limits the flags set."""

    def __init__(self, max_new_tokens: int, max_tokens_limit: int):
        self.max_new_tokens, self.max_tokens_limit = max_new_tokens, max_tokens_limit


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    problems, param = [], None
    for item in exc.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        if item.get("type") == "json_invalid":
            detail = item.get("ctx", {}).get("error") or item.get("msg")
            return APIError(400, f"The request body is not valid JSON: {detail}.")
        if where == "" and item.get("type") == "model_attributes_type":
            return APIError(400, "The request body must be a JSON object, sent with Content-Type: application/json.")
        param = param or where or None
        problems.append(f"{where or 'body'}: {item.get('msg')}")
    return APIError(400, "Invalid request: " + "; ".join(problems) + ".", param=param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # never a bare 500 page
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def _check_key(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not given:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return check


def _generation(worker: GenerationWorker, served: ServedModel, prompt_ids: list[int], body: _Request,
                limits: ServeLimits) -> GenerationRequest:
    if body.n != 1:
        raise APIError(400, f"n: lmtune serve generates one answer per request (got n={body.n}); send n "
                       "requests instead.", param="n")
    unsupported = body.unsupported_fields()
    if unsupported:
        raise APIError(400, f"{', '.join(unsupported)}: not supported by lmtune serve; remove "
                       f"{'it' if len(unsupported) == 1 else 'them'} from the request.", param=unsupported[0])
    max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_new_tokens
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"max_tokens: {max_tokens} is more than this server allows ({limits.max_tokens_limit}, "
                       "--max_tokens_limit).", param="max_tokens")
    greedy = body.temperature == 0
    config = build_generation_config(
        worker.model, worker.tokenizer.pad_token_id, max_new_tokens=max_tokens, num_beams=1, do_sample=not greedy,
        temperature=None if greedy else body.temperature, top_p=None if greedy else body.top_p,
        num_return_sequences=1,
    )
    config.eos_token_id = list(served.stop_ids)
    return GenerationRequest(prompt_ids, served.adapter, config, served.stop_ids, body.stop_strings(), body.seed)


def _submit(worker: GenerationWorker, request: GenerationRequest) -> Job:
    try:
        return worker.submit(request, asyncio.get_running_loop())
    except Overloaded as err:
        raise APIError(503, str(err), type="server_error", code="overloaded") from None


def _finished(event: Finish | BaseException) -> Finish:
    if isinstance(event, BaseException):
        raise APIError(500, f"generation failed: {type(event).__name__}: {event}", type="server_error")
    if event.finish_reason == "cancelled":
        raise APIError(503, "The server is stopping; the request was cancelled.", type="server_error",
                       code="shutting_down")
    return event


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to close its connection, then cancel its job (as sse-starlette does for streams)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Job, request: Request) -> tuple[str, Finish]:
    """The whole answer of a non-streamed request, cancelling it if the client goes away."""
    pieces: list[str] = []
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        while isinstance(event := await job.events.get(), str):
            pieces.append(event)
        return "".join(pieces), _finished(event)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once finished; stops generation if this handler is cancelled


async def _events(job: Job, first: dict | None, piece, last) -> AsyncIterator[dict[str, str]]:
    """SSE events: ``first`` (if any), one per text piece, the closing chunk, then ``[DONE]``."""
    try:
        if first is not None:
            yield {"data": json.dumps(first)}
        while True:
            event = await job.events.get()
            if isinstance(event, str):
                yield {"data": json.dumps(piece(event))}
                continue
            try:
                yield {"data": json.dumps(last(_finished(event)))}
            except APIError as err:
                yield {"data": json.dumps(err.body())}
            yield {"data": "[DONE]"}
            return
    finally:
        job.cancel()  # the client went away (sse-starlette cancels this generator) or the answer is complete


def _served(catalog: Catalog, name: str | None) -> ServedModel:
    try:
        return catalog.get(name)
    except UnknownModel as err:
        raise APIError(404, str(err), param="model", code="model_not_found") from None


def _prompt(render, *args) -> list[int]:
    try:
        return render(*args)
    except PromptTooLong as err:
        raise APIError(413, str(err), param="messages", code="context_length_exceeded") from None
    except DataFormatError as err:
        raise APIError(400, str(err), param="messages") from None


def _add_info_routes(app: FastAPI, catalog: Catalog, authorized: list) -> None:
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(catalog.models)}

    @app.api_route("/v1/models", methods=["GET", "POST"], dependencies=authorized)
    async def models() -> dict[str, Any]:
        base = next(iter(catalog.models))  # adapters are served on the base, listed first
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": "lmtune", "root": m.source,
                 "parent": None if m.adapter is None else base} for m in catalog.models.values()]
        return {"object": "list", "data": data}


def _add_generation_routes(app: FastAPI, catalog: Catalog, worker: GenerationWorker, limits: ServeLimits,
                           authorized: list) -> None:
    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = _served(catalog, body.model)
        ids = _prompt(catalog.chat_prompt_ids, model, [m.model_dump() for m in body.messages])
        job = _submit(worker, _generation(worker, model, ids, body, limits))
        rid = new_id("chatcmpl")
        if body.stream:
            return EventSourceResponse(_events(
                job, chat_chunk(rid, model.name, {"role": "assistant", "content": ""}),
                lambda text: chat_chunk(rid, model.name, {"content": text}),
                lambda end: chat_chunk(rid, model.name, {}, end.finish_reason, usage(len(ids), end.completion_tokens)),
            ))
        text, end = await _collect(job, request)
        return chat_response(rid, model.name, text, end.finish_reason, len(ids), end.completion_tokens)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        model = _served(catalog, body.model)
        ids = _prompt(catalog.text_prompt_ids, body.prompt_text())
        job = _submit(worker, _generation(worker, model, ids, body, limits))
        rid = new_id("cmpl")
        if body.stream:
            return EventSourceResponse(_events(
                job, None, lambda text: completion_response(rid, model.name, text, None, chunk=True),
                lambda end: completion_response(rid, model.name, "", end.finish_reason,
                                                usage(len(ids), end.completion_tokens), chunk=True),
            ))
        text, end = await _collect(job, request)
        return completion_response(rid, model.name, text, end.finish_reason, usage(len(ids), end.completion_tokens))


def build_app(catalog: Catalog, worker: GenerationWorker, *, limits: ServeLimits, api_key: str | None = None,
              cors_origins: list[str] | None = None) -> FastAPI:
    """The application serving ``catalog``'s models through ``worker``.

    Args:
        catalog: The served models and their prompt rendering (``load_catalog``).
        worker: The generation worker running on the catalog's model.
        limits: ``--max_new_tokens`` and ``--max_tokens_limit``.
        api_key: Required as ``Authorization: Bearer KEY`` on ``/v1`` when set.
        cors_origins: Browser origins allowed to call the API from pages of their own.
    """
    app = FastAPI(title="lmtune serve", docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    _install_error_handlers(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    authorized = [Depends(_check_key(api_key))]
    _add_info_routes(app, catalog, authorized)
    _add_generation_routes(app, catalog, worker, limits, authorized)
    return app
