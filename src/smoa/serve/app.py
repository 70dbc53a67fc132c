"""`build_app(config)`: the FastAPI app of `smoa serve`.

Startup (FastAPI ``lifespan``) starts loading the model and the library in a thread and returns at once, so
``GET /health`` can answer 503 while loading and 200 after. Shutdown drains (in-flight requests finish, new
ones get 503) and closes the library. Every error leaves as ``{"error": {"message", "type", "param", "code"}}``.
Bodies over the cap are refused with 413 from their ``Content-Length`` (or as soon as the streamed bytes pass
the cap), before they are read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smoa.errors import SmoaError
from smoa.serve.api_router import build_routers, error_response
from smoa.serve.config import ServeConfig
from smoa.serve.errors import APIError, PayloadTooLargeError, as_api_error
from smoa.serve.serving import SmoaServing

__all__ = ["build_app"]

log = logging.getLogger("smoa.serve")
_LORAX_PATHS = ("/generate", "/generate_stream", "/")


def build_app(config: ServeConfig, serving: SmoaServing | None = None, *, load: bool = True) -> FastAPI:
    """The server app.

    Args:
        config: the server configuration.
        serving: an existing serving layer (default: a new :class:`SmoaServing` for ``config``).
        load: start loading the model at startup (``False``: the caller calls ``serving.load()``).
    """
    serving = serving or SmoaServing(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(asyncio.to_thread(_load_quietly, serving)) if load else None
        app.state.loader = loader
        try:
            yield
        finally:
            serving.begin_drain()
            if loader is not None:
                with contextlib.suppress(BaseException):
                    await loader
            await asyncio.to_thread(serving.close)

    app = FastAPI(title="smoa", version=_version(), lifespan=lifespan,
                  description="Sparse Mixtures of Adapters: OpenAI- and LoRAX-compatible serving, every request "
                              "its own routed adapter mixture.")  # fmt: skip
    app.state.serving = serving
    app.state.config = config
    for router in build_routers():
        app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes, upload_limit=config.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, serving=serving)
    return app


def _load_quietly(serving: SmoaServing) -> None:
    try:
        serving.load()
    except BaseException:  # noqa: BLE001 - reported by /health and every request (503)
        pass


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("smoa")
    except Exception:  # noqa: BLE001
        return "0"


# == errors ==========================================================================================================
def _is_lorax(request: Request) -> bool:
    return request.url.path in _LORAX_PATHS


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, lorax=_is_lorax(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = "; ".join(f"`{'.'.join(str(x) for x in e.get('loc', ()) if x not in ('body',)) or 'body'}`: "
                        f"{e.get('msg', 'invalid')}" for e in errors[:5])  # fmt: skip
        err = APIError(msg or "invalid request", param=param, code="invalid_value")
        err.status, err.type = 422, "invalid_request_error"
        return error_response(err, lorax=_is_lorax(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail))
        err.status = exc.status_code
        err.type = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(err, lorax=_is_lorax(request))

    @app.exception_handler(SmoaError)
    async def smoa_error(request: Request, exc: SmoaError) -> JSONResponse:
        return error_response(as_api_error(exc), lorax=_is_lorax(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("smoa serve: unhandled error on %s", request.url.path)
        return error_response(APIError(f"internal error: {type(exc).__name__}"), lorax=_is_lorax(request))


# == middleware (pure ASGI: streaming and disconnect detection stay intact) =================================================
class BodyLimitMiddleware:
    """413 for a body over the cap: from ``Content-Length`` before reading, or once streamed bytes pass it.

    ``POST /v1/adapters`` (uploads) has its own, larger cap.
    """

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/adapters"
        limit = self.upload_limit if upload else self.limit
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_413(send, limit, length)
            return
        seen = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # answer 413 now; the app sees a disconnect and its own answer is dropped
                    refused = True
                    if not started:
                        await _send_413(send, limit, None)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int, length: int | None) -> None:
    import json

    got = f" ({length} bytes)" if length is not None else ""
    err = PayloadTooLargeError(f"request body too large{got}: the limit is {limit} bytes", param="body",
                               code="body_too_large")  # fmt: skip
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts every request by endpoint (route template) and status; observes its duration."""

    def __init__(self, app: ASGIApp, serving: SmoaServing) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            label = str(getattr(route, "path", "")) or "other"
            with contextlib.suppress(Exception):
                self.serving.metrics.observe_request(label, status, time.perf_counter() - t0)


