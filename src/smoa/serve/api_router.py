"""Thin FastAPI routers: authenticate, parse, call :class:`~smoa.serve.serving.SmoaServing`, shape the response.

Endpoints (inference key unless marked admin):

====================================  =======================================================================
``GET  /health``                      200 once the model is loaded, 503 before (no key)
``GET  /metrics``                     Prometheus text (no key)
``GET  /v1/models``                   base model, ``smoa``, adapters (``offset``, ``limit``)
``POST /v1/completions``              OpenAI completions (``stream``: SSE ending ``data: [DONE]``)
``POST /v1/chat/completions``         OpenAI chat completions
``POST /generate``, ``/generate_stream``, ``/``   LoRAX
``POST /v1/route``                    route only (admin)
``GET|POST /v1/adapters``             list (``tag``, ``q``, ``status``, ``offset``, ``limit``) / upload (admin)
``GET|PATCH|DELETE /v1/adapters/{id}``  one adapter (admin)
``POST /v1/adapters/{id}/archive|restore``  (admin)
``POST /v1/optimize``, ``GET /v1/stats``  (admin)
====================================  =======================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from smoa.serve.auth import authorize
from smoa.serve.errors import APIError, BadRequestError, ServiceUnavailableError, as_api_error
from smoa.serve.metrics import CONTENT_TYPE
from smoa.serve.protocol import (
    AdapterPatch,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    OptimizeRequest,
    RouteRequest,
)
from smoa.serve.serving import Selection, SmoaServing

__all__ = ["build_routers", "error_response"]

T = TypeVar("T")
ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,256}$"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz")


def error_response(err: APIError, lorax: bool = False) -> JSONResponse:
    body = err.body()
    kind = {429: "overloaded", 400: "validation", 422: "validation", 500: "generation"}.get(err.status)
    if lorax and kind:  # lorax-client reads `error_type` first, then the status
        body["error_type"] = kind
    return JSONResponse(body, status_code=err.status, headers=err.headers())


def _serving(request: Request) -> SmoaServing:
    return request.app.state.serving  # type: ignore[no-any-return]


def _client(request: Request, admin: bool) -> str:
    s = _serving(request)
    who = authorize(request.headers.get("authorization"), s.config.api_keys, s.config.admin_keys, admin=admin)
    if who == "anonymous" and request.client is not None:
        who = f"ip-{request.client.host}"
    return who


def user(request: Request) -> str:
    """Dependency: an inference (or admin) key."""
    return _client(request, admin=False)


def admin(request: Request) -> str:
    """Dependency: an admin key."""
    return _client(request, admin=True)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its sequences are cancelled with it)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ServiceUnavailableError("client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()


def _headers(sel: Selection) -> dict[str, str]:
    return {"x-smoa-adapters": sel.header()}


async def _stream(request: Request, events: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Forward SSE strings; stop (and so cancel the sequences) when the client is gone."""
    try:
        async for chunk in events:
            yield chunk.encode("utf-8")
            if await request.is_disconnected():
                break
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _sse_response(request: Request, events: AsyncIterator[str], sel: Selection) -> StreamingResponse:
    return StreamingResponse(_stream(request, events), media_type="text/event-stream",
                             headers={**_headers(sel), "Cache-Control": "no-cache"})  # fmt: skip


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


# == routers =========================================================================================================
def build_routers() -> list[APIRouter]:
    """The routers of the app (health/metrics, OpenAI, LoRAX, management)."""
    return [_system_router(), _openai_router(), _lorax_router(), _admin_router()]


def _system_router() -> APIRouter:
    r = APIRouter(tags=["system"])

    @r.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok, body = _serving(request).health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @r.get("/metrics")
    async def metrics(request: Request) -> Response:
        data = await asyncio.to_thread(_serving(request).metrics.render)
        return Response(data, media_type=CONTENT_TYPE)

    return r


def _openai_router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["openai"])

    @r.get("/models")
    async def models(request: Request, _who: str = Depends(user), offset: int = Query(0, ge=0, le=10**9),
                     limit: int = Query(100, ge=1, le=10_000)) -> JSONResponse:  # fmt: skip
        s = _serving(request)
        return JSONResponse(await _blocking(s.list_models, offset, min(limit, s.config.max_page_size)))

    @r.post("/completions")
    async def completions(body: CompletionRequest, request: Request, who: str = Depends(user)) -> Response:
        s = _serving(request)
        gen, lens = await s.prepare_completion(body, who)
        s.submit(gen)  # 429 / 503 before any byte of the response
        if body.stream:
            return _sse_response(request, s.completion_stream(body, gen, lens), gen.selection)
        out = await _until_disconnect(request, s.completion(body, gen, lens))
        return JSONResponse(out, headers=_headers(gen.selection))

    @r.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, who: str = Depends(user)) -> Response:
        s = _serving(request)
        gen, lens = await s.prepare_chat(body, who)
        s.submit(gen)
        if body.stream:
            return _sse_response(request, s.chat_stream(body, gen, lens), gen.selection)
        out = await _until_disconnect(request, s.chat(body, gen, lens))
        return JSONResponse(out, headers=_headers(gen.selection))

    return r


def _lorax_router() -> APIRouter:
    r = APIRouter(tags=["lorax"])

    async def run(body: GenerateRequest, request: Request, who: str, stream: bool, as_list: bool = False) -> Response:
        s = _serving(request)
        gen, n = await s.prepare_generate(body, who)
        s.submit(gen)
        if stream:
            return _sse_response(request, s.generate_stream(body, gen, n), gen.selection)
        out = await _until_disconnect(request, s.generate(body, gen, n))
        return JSONResponse([out] if as_list else out, headers=_headers(gen.selection))

    @r.post("/generate")
    async def generate(body: GenerateRequest, request: Request, who: str = Depends(user)) -> Response:
        return await run(body, request, who, stream=False)

    @r.post("/generate_stream")
    async def generate_stream(body: GenerateRequest, request: Request, who: str = Depends(user)) -> Response:
        return await run(body, request, who, stream=True)

    @r.post("/")
    async def compat_generate(body: GenerateRequest, request: Request, who: str = Depends(user)) -> Response:
        """LoRAX's ``POST /`` (what ``lorax.Client`` posts to): ``stream`` picks generate or generate_stream; a
        non-streamed answer is a one-element list, as LoRAX (TGI) sends it."""
        return await run(body, request, who, stream=body.stream, as_list=True)

    return r


def _admin_router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["management"], dependencies=[Depends(admin)])
    aid = {"pattern": ID_PATTERN, "max_length": 256}

    @r.get("/adapters")
    async def list_adapters(request: Request, tag: str | None = Query(None, max_length=128),
                            q: str | None = Query(None, max_length=1024),
                            status: str | None = Query(None, pattern="^(active|archived|merged)$"),
                            offset: int = Query(0, ge=0, le=10**9),
                            limit: int = Query(100, ge=1, le=10_000)) -> JSONResponse:  # fmt: skip
        s = _serving(request)
        return JSONResponse(await _blocking(s.list_adapters, tag, q, status, offset, min(limit, s.config.max_page_size)))

    @r.post("/adapters", status_code=201, openapi_extra=_UPLOAD_SCHEMA)
    async def upload(request: Request) -> JSONResponse:
        s = _serving(request)
        s.check_ready()
        files, fields, tmp = await _read_upload(request)
        try:
            out = await _blocking(s.upload_adapter, files, fields)
        finally:
            for p in tmp:
                p.unlink(missing_ok=True)
        return JSONResponse(out, status_code=201)

    @r.get("/adapters/{adapter_id}")
    async def get_adapter(request: Request, adapter_id: str = _path(aid)) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).get_adapter, adapter_id))

    @r.patch("/adapters/{adapter_id}")
    async def patch_adapter(body: AdapterPatch, request: Request, adapter_id: str = _path(aid)) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).patch_adapter, adapter_id, body))

    @r.delete("/adapters/{adapter_id}")
    async def delete_adapter(request: Request, adapter_id: str = _path(aid)) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).delete_adapter, adapter_id))

    @r.post("/adapters/{adapter_id}/archive")
    async def archive(request: Request, adapter_id: str = _path(aid)) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).archive_adapter, adapter_id))

    @r.post("/adapters/{adapter_id}/restore")
    async def restore(request: Request, adapter_id: str = _path(aid)) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).restore_adapter, adapter_id))

    @r.post("/route")
    async def route(body: RouteRequest, request: Request) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).route, body))

    @r.post("/optimize")
    async def optimize(request: Request, body: OptimizeRequest | None = None) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).optimize, body or OptimizeRequest()))

    @r.get("/stats")
    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(await _blocking(_serving(request).stats))

    return r


def _path(constraints: dict[str, Any]) -> Any:
    from fastapi import Path as PathParam

    return PathParam(..., **constraints)


# == multipart upload ================================================================================================
_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_config", "adapter_model"],
                    "properties": {
                        "adapter_config": {"type": "string", "format": "binary",
                                           "description": "adapter_config.json"},
                        "adapter_model": {"type": "string", "format": "binary",
                                          "description": "adapter_model.safetensors (pickled .bin refused)"},
                        "domain_tags": {"type": "string", "description": "comma-separated, or repeat the field"},
                        "skill_tags": {"type": "string"},
                        "description": {"type": "string"},
                        "examples": {"type": "string", "description": "JSON list of strings, or repeat the field"},
                        "specialization": {"type": "string", "enum": ["domain", "skill", "task", "custom"]},
                    },
                }
            }
        },
    }
}
_TEXT_FIELDS = ("domain_tags", "skill_tags", "description", "examples", "specialization")


def _role(field: str, filename: str | None) -> str | None:
    """Which PEFT file an uploaded part is (by its file name, else its field name); pickles are refused."""
    name = Path(filename or "").name.lower()
    key = field.lower()
    if name.endswith(_PICKLE_SUFFIXES) or key.endswith(_PICKLE_SUFFIXES):
        raise BadRequestError(
            f"`{field}` ({filename!r}): pickled weight files are refused (nothing is stored or loaded); upload "
            "adapter_model.safetensors", param=field, code="unsafe_adapter_file",
        )  # fmt: skip
    if name == "adapter_config.json" or key in ("adapter_config", "adapter_config.json", "config"):
        return "adapter_config.json"
    if name == "adapter_model.safetensors" or key in ("adapter_model", "adapter_model.safetensors", "model",
                                                         "weights"):  # fmt: skip
        return "adapter_model.safetensors"
    return None


async def _read_upload(request: Request) -> tuple[dict[str, Path], dict[str, Any], list[Path]]:
    """Parse the multipart body: the two PEFT files (spooled to temp files outside the library) and the fields."""
    import tempfile

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise BadRequestError("the upload must be multipart/form-data with adapter_config and adapter_model files",
                              param="body")  # fmt: skip
    try:
        form = await request.form(max_files=4, max_fields=256)
    except Exception as exc:  # malformed multipart
        raise BadRequestError(f"malformed multipart body: {exc}", param="body") from exc
    files: dict[str, Path] = {}
    tmp: list[Path] = []
    raw: dict[str, list[str]] = {}
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read") and hasattr(value, "filename"):
                role = _role(key, value.filename)
                if role is None:
                    raise BadRequestError(f"unexpected file `{key}` ({value.filename!r}); expected adapter_config.json"
                                          " and adapter_model.safetensors", param=key)  # fmt: skip
                if role in files:
                    raise BadRequestError(f"`{role}` uploaded twice", param=key)
                fd, name = tempfile.mkstemp(prefix="smoa-part-")
                path = Path(name)
                tmp.append(path)
                await asyncio.to_thread(_spool, value.file, fd)
                files[role] = path
            elif key in _TEXT_FIELDS:
                raw.setdefault(key, []).append(str(value))
        for role, param in (("adapter_config.json", "adapter_config"), ("adapter_model.safetensors", "adapter_model")):
            if role not in files:
                raise BadRequestError(f"missing file `{param}` ({role})", param=param)
        return files, _upload_fields(raw), tmp
    except BaseException:
        for p in tmp:
            p.unlink(missing_ok=True)
        raise
    finally:
        await form.close()


def _spool(src: Any, fd: int) -> None:
    """Copy an uploaded part (already spooled by the form parser) to the temp file ``fd`` (outside the library)."""
    import shutil

    src.seek(0)
    with open(fd, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _split_list(values: list[str], name: str) -> list[str]:
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError as exc:
                raise BadRequestError(f"`{name}` is not a JSON list: {exc}", param=name) from exc
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise BadRequestError(f"`{name}` must be a list of strings", param=name)
            out.extend(parsed)
        elif name == "examples":
            out.append(v)
        else:
            out.extend(x.strip() for x in re.split(r",", v) if x.strip())
    return out


def _upload_fields(raw: dict[str, list[str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("domain_tags", "skill_tags", "examples"):
        if name in raw:
            fields[name] = _split_list(raw[name], name)
    if "description" in raw:
        fields["description"] = raw["description"][-1]
    if "specialization" in raw:
        fields["specialization"] = raw["specialization"][-1]
    return fields


# == request accounting ==============================================================================================
def endpoint_label(request: Request) -> str:
    """The route's path template (``/v1/adapters/{adapter_id}``), so metrics labels stay bounded."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "other"


async def timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware: count the request by endpoint and status, observe its duration."""
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    except APIError as exc:
        status = exc.status
        raise
    finally:
        serving = getattr(request.app.state, "serving", None)
        if serving is not None:
            serving.metrics.observe_request(endpoint_label(request), status, time.perf_counter() - t0)


__all__ += ["as_api_error", "timed"]
