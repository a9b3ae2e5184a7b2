"""The OpenAI-compatible HTTP server over a :class:`~deltakit.runtime.engine.ServingEngine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's bodies),
``GET /health``. With an API key every route needs ``Authorization: Bearer KEY``. Every error is a JSON
body of OpenAI's shape: 400 bad input, 401 no/wrong key, 404 unknown model or path, 405 wrong method,
409 a delta made from another base, 413 a body over ``max_body_bytes``, 500 an internal error (no
details; they go to the log).

Requests are isolated: tokenization runs in worker threads (not on the event loop), a request that
fails never fails the requests batched with it, and a generation stops when its client disconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltakit.errors import (
    BaseMismatchError,
    DeltakitError,
    NonFiniteError,
    NotFoundError,
    TensorMismatchError,
    UsageError,
)
from deltakit.runtime.engine import ServingEngine
from deltakit.runtime.generate import GenerationResult
from deltakit.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
)
from deltakit.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
#: default cap on a request body (bytes)
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: how often a waiting request checks whether its client is still connected (seconds)
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of the HTTP layer (prompt tokens are capped by the engine)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def _error(status: int, message: str, type_: str, code: str | int | None = None, param: str | None = None):
    return JSONResponse(
        error_body(message, type_, code if code is not None else status, param), status_code=status
    )


def error_for(exc: BaseException) -> JSONResponse:
    """Map an exception to an HTTP status and an OpenAI error body (one line, no traceback)."""
    if isinstance(exc, NotFoundError):
        return _error(404, _line(exc), "NotFoundError", "model_not_found", "model")
    if isinstance(exc, BaseMismatchError):
        return _error(409, _line(exc), "BaseMismatchError", "base_mismatch")
    if isinstance(exc, (UsageError, TensorMismatchError)):
        return _error(400, _line(exc), "BadRequestError", "invalid_request")
    if isinstance(exc, NonFiniteError):
        return _error(400, _line(exc), "BadRequestError", "non_finite_delta")
    if isinstance(exc, DeltakitError):
        return _error(400, f"{type(exc).__name__}: {_line(exc)}", "BadRequestError", "invalid_delta")
    log.error("internal error", exc_info=exc)
    return _error(500, "internal server error (details are in the server log)", "InternalServerError")


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def create_app(
    engine: ServingEngine, *, api_key: str | None = None, limits: ServerLimits | None = None
) -> FastAPI:
    """A FastAPI app serving ``engine``; ``api_key``: required bearer token (None: open)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="deltakit", version="1")
    app.state.engine = engine
    _add_guards(app, api_key, limits)
    _add_error_handlers(app)
    _add_info_routes(app, engine)
    _add_generation_routes(app, engine)
    _add_adapter_routes(app, engine)
    return app


class BodyLimit:
    """ASGI middleware: a body over ``cap`` bytes gets 413, by its Content-Length or, for a chunked body
    without one, as soon as the bytes received pass the cap (such a body is buffered, then replayed)."""

    def __init__(self, app, cap: int):
        self.app = app
        self.cap = cap

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                bad = _error(400, "invalid Content-Length header", "BadRequestError", "invalid_request")
                return await bad(scope, receive, send)
            if int(length) > self.cap:
                return await _too_large(self.cap)(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.cap:
                return await _too_large(self.cap)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: every route needs ``Authorization: Bearer KEY`` (compared in constant time).

    Plain ASGI (not ``@app.middleware``) so that handlers see the server's own ``receive`` and
    ``request.is_disconnected()`` works."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        if not secrets.compare_digest(given, self.key):
            refused = _error(
                401,
                "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                "AuthenticationError",
                "invalid_api_key",
            )
            return await refused(scope, receive, send)
        await self.app(scope, receive, send)


def _add_guards(app: FastAPI, api_key: str | None, limits: ServerLimits) -> None:
    """The body size cap, then (outermost) the API key check on every route."""
    app.add_middleware(BodyLimit, cap=limits.max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)


def _too_large(cap: int) -> JSONResponse:
    return _error(413, f"the request body is over {cap} bytes", "BadRequestError", "body_too_large")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return _error(
            400, " ".join(message.split()), "BadRequestError", "invalid_request", ".".join(loc) or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = (
            "NotFoundError"
            if exc.status_code == 404
            else "BadRequestError"
            if exc.status_code < 500
            else "Error"
        )
        return _error(exc.status_code, " ".join(str(exc.detail).split()), kind)

    @app.exception_handler(DeltakitError)
    async def deltakit_error(request: Request, exc: DeltakitError):
        return error_for(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return error_for(exc)


def _add_info_routes(app: FastAPI, engine: ServingEngine) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": engine.base_name, "active": engine.runtime.active}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": engine.models()}


def _add_generation_routes(app: FastAPI, engine: ServingEngine) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = body.sampling(DEFAULT_MAX_TOKENS)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream and len(prompts) != 1:
            raise UsageError("streaming takes a single prompt")
        ids = [await asyncio.to_thread(engine.encode_prompt, p) for p in prompts]
        if body.stream:
            return await _stream(engine, request, body.model, ids[0], params, rid, created, chat=False)
        results = await _run_all(engine, request, body.model, ids, params)
        choices = [
            {
                "index": i,
                "text": (prompts[i] if body.echo else "") + r.text,
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(results),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        params = body.sampling(DEFAULT_MAX_TOKENS)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=body.max_completion_tokens)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await asyncio.to_thread(engine.encode_chat, messages)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return await _stream(engine, request, body.model, ids, params, rid, created, chat=True)
        (result,) = await _run_all(engine, request, body.model, [ids], params)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": _usage([result]),
        }


def _add_adapter_routes(app: FastAPI, engine: ServingEngine) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _run_all(
    engine: ServingEngine, request: Request, model: str, ids: list[list[int]], params: SamplingParams
) -> list[GenerationResult]:
    """Queue one generation per prompt and wait for all; a client that disconnects cancels them."""
    cancel = threading.Event()
    try:  # a prompt refused after others were queued cancels those (finally)
        futures = [engine.submit(model, p, params, cancel=cancel) for p in ids]
        waiting = [asyncio.wrap_future(f) for f in futures]
        while True:
            done, pending = await asyncio.wait(waiting, timeout=DISCONNECT_POLL_S)
            if not pending:
                break
            if await request.is_disconnected():
                cancel.set()  # the generations stop at their next token
                await asyncio.wait(waiting)
                break
        return [w.result() for w in waiting]
    finally:
        cancel.set()  # no-op for finished generations; stops the others when the handler is cancelled


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(rid: str, created: int, model: str, chat: bool, text: str | None, finish: str | None, first=False):
    """One server-sent event of a streamed completion."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    kind = "chat.completion.chunk" if chat else "text_completion"
    payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    engine: ServingEngine,
    request: Request,
    model: str,
    ids: list[int],
    params: SamplingParams,
    rid: str,
    created: int,
    *,
    chat: bool,
):
    """A server-sent-events response; the request is queued before the response starts (errors are JSON).

    The generation is cancelled when the client disconnects (checked while waiting for text, and when
    the response task is cancelled).
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    cancel = threading.Event()
    future: Future = engine.submit(
        model, ids, params, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t), cancel=cancel
    )
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield _chunk(rid, created, model, chat, None, None, first=True)
            while True:
                try:
                    piece = await asyncio.wait_for(pieces.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if piece is None:
                    break
                yield _chunk(rid, created, model, chat, piece, None)
            try:
                result: GenerationResult = future.result()
            except Exception as exc:
                yield f"data: {json.dumps(json.loads(error_for(exc).body))}\n\n"
            else:
                yield _chunk(rid, created, model, chat, None, result.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream")
