"""Call an ASGI application in-process: its lifespan, and one HTTP request as a stream of messages.

A Ray Serve model replica runs the single-process smoa server (``smoa.serve.app.build_app``) inside itself and
feeds it the requests the ingress forwards, without a socket in between::

    ingress ──(Ray handle, pickled ForwardedRequest)──▶ replica: call_asgi(app, request)
                                                          │  yields ResponseHead, then body chunks (bytes)
    ingress ◀──(Ray streaming generator)──────────────────┘

So a replica answers with exactly the bytes, status codes and headers of the single-process server: the HTTP API
has one implementation. Cancelling the consumer of :func:`call_asgi` (a client disconnects, the ingress gives
up) delivers ``http.disconnect`` to the application and then cancels its task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
_DONE = object()


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it (headers as latin-1 ``(name, value)`` pairs, names lower-case)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass
class ResponseHead:
    """Status and headers of a response (``headers`` as ``(name, value)`` pairs, names lower-case)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    replica: str = ""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


class LifespanError(RuntimeError):
    """The application's lifespan startup or shutdown failed (the message is the application's)."""


class Lifespan:
    """Runs an ASGI application's ``lifespan`` protocol: :meth:`startup` before requests, :meth:`shutdown` after.

    ``state`` is the lifespan state dict the application may fill at startup; every request scope gets a shallow
    copy of it (as uvicorn does).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.supported = True

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._to_app.get, self._from_app.put)
        except BaseException as exc:  # an app without lifespan support raises on the unknown scope type
            await self._from_app.put({"type": "lifespan.error", "message": repr(exc)})
            raise

    async def _expect(self, sent: str, ok: str, failed: str) -> None:
        await self._to_app.put({"type": sent})
        reply = await self._from_app.get()
        if reply["type"] == failed:
            raise LifespanError(reply.get("message") or failed)
        if reply["type"] == "lifespan.error":
            self.supported = False
            return
        if reply["type"] != ok:
            raise LifespanError(f"unexpected lifespan message {reply['type']!r}")

    async def startup(self) -> None:
        """Run the application's startup (model load, library open); raises :class:`LifespanError` on failure."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._expect("lifespan.startup", "lifespan.startup.complete", "lifespan.startup.failed")

    async def shutdown(self) -> None:
        """Run the application's shutdown (drain, close the library)."""
        if self._task is None or not self.supported or self._task.done():
            return
        await self._expect("lifespan.shutdown", "lifespan.shutdown.complete", "lifespan.shutdown.failed")
        with contextlib.suppress(BaseException):
            await self._task


def _scope(request: ForwardedRequest, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method.upper(),
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1", "replace"),
        "query_string": request.query_string,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": request.client or ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": dict(state),
    }


async def call_asgi(app: Any, request: ForwardedRequest, state: dict[str, Any] | None = None) -> AsyncIterator[Any]:
    """Run ``request`` through ``app``; yield one :class:`ResponseHead`, then the body chunks (``bytes``).

    The body is streamed as the application sends it (server-sent events arrive chunk by chunk). Closing or
    cancelling the iterator tells the application the client went away and cancels its task.
    """
    out: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(request, state or {}), receive, out.put)
        finally:
            await out.put(_DONE)

    task = asyncio.get_running_loop().create_task(run())
    try:
        async for item in _messages(out, task):
            yield item
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.sleep(0)  # let the app see the disconnect first
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _messages(out: asyncio.Queue[Any], task: asyncio.Task[None]) -> AsyncIterator[Any]:
    started = False
    while True:
        message = await out.get()
        if message is _DONE:
            if not started:
                task.result()  # re-raise what the application raised before sending a response
                raise RuntimeError("the ASGI application returned without sending a response")
            return
        if message["type"] == "http.response.start":
            started = True
            headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", [])]
            yield ResponseHead(status=int(message["status"]), headers=headers)
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                yield bytes(chunk)
            if not message.get("more_body", False):
                return
