"""The OpenAI-compatible HTTP server over a :class:`~deltakit.runtime.engine.ServingEngine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's bodies),
``GET /health``. With an API key every route needs ``Authorization: Bearer KEY``. Errors use OpenAI's
shape: 400 bad input, 401 no/wrong key, 404 unknown model, 409 a delta made from another base.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltakit.errors import BaseMismatchError, DeltakitError, NotFoundError, TensorMismatchError, UsageError
from deltakit.runtime.engine import ServingEngine
from deltakit.runtime.generate import GenerationResult
from deltakit.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
)

DEFAULT_MAX_TOKENS = 16


def _error(status: int, message: str, type_: str, code: str | int | None = None, param: str | None = None):
    return JSONResponse(
        error_body(message, type_, code if code is not None else status, param), status_code=status
    )


def error_for(exc: Exception) -> JSONResponse:
    """Map a deltakit error to an HTTP status and an OpenAI error body."""
    if isinstance(exc, NotFoundError):
        return _error(404, str(exc), "NotFoundError", "model_not_found", "model")
    if isinstance(exc, BaseMismatchError):
        return _error(409, str(exc), "BaseMismatchError", "base_mismatch")
    if isinstance(exc, (UsageError, TensorMismatchError)):
        return _error(400, str(exc), "BadRequestError", "invalid_request")
    if isinstance(exc, DeltakitError):
        return _error(400, f"{type(exc).__name__}: {exc}", "BadRequestError", "invalid_delta")
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


def create_app(engine: ServingEngine, *, api_key: str | None = None) -> FastAPI:
    """A FastAPI app serving ``engine``; ``api_key``: required bearer token (None: open)."""
    app = FastAPI(title="deltakit", version="1")
    app.state.engine = engine

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return _error(
                    401,
                    "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                    "AuthenticationError",
                    "invalid_api_key",
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return _error(400, message, "BadRequestError", "invalid_request", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(
            exc.status_code, str(exc.detail), "NotFoundError" if exc.status_code == 404 else "Error"
        )

    @app.exception_handler(DeltakitError)
    async def deltakit_error(request: Request, exc: DeltakitError):
        return error_for(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": engine.base_name, "active": engine.runtime.active}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": engine.models()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        params = body.sampling(DEFAULT_MAX_TOKENS)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise UsageError("streaming takes a single prompt")
            return _stream(
                engine, body.model, engine.encode_prompt(prompts[0]), params, rid, created, chat=False
            )
        futures = [engine.submit(body.model, engine.encode_prompt(p), params) for p in prompts]
        results: list[GenerationResult] = [await asyncio.wrap_future(f) for f in futures]
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
    async def chat(body: ChatCompletionRequest):
        params = body.sampling(DEFAULT_MAX_TOKENS)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            params = type(params)(
                body.max_completion_tokens, params.temperature, params.top_p, params.stop, params.seed
            )
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _stream(engine, body.model, ids, params, rid, created, chat=True)
        result: GenerationResult = await asyncio.wrap_future(engine.submit(body.model, ids, params))
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

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(engine: ServingEngine, model: str, ids: list[int], params, rid: str, created: int, *, chat: bool):
    """A server-sent-events response; the request is queued before the response starts (errors are JSON)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    future = engine.submit(
        model, ids, params, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)
    )
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            piece = await pieces.get()
            if piece is None:
                break
            yield chunk(piece, None)
        try:
            result: GenerationResult = future.result()
        except Exception as exc:
            yield f"data: {json.dumps(json.loads(error_for(exc).body))}\n\n"
        else:
            yield chunk(None, result.finish_reason)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
