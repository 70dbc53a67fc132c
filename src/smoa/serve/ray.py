"""smoa on Ray Serve: an ingress that places each request by adapter affinity, and model replicas behind it.

::

    client ──HTTP──▶ Serve proxy ──▶ SmoaIngress (1 replica, FastAPI)
                                       │ 1. read the body (capped), find its placement (ray_affinity.placement_of):
                                       │    explicit adapters, or routed (a replica's POST /v1/route, cached 5 s)
                                       │ 2. key = affinity_key(adapter ids)   e.g. "bbc-sports|bbc-tech"
                                       ▼ 3. handle.options(multiplexed_model_id=key, stream=True).forward(request)
                                     SmoaModelReplica × N   (each: the single-process server, smoa.serve.app,
                                       │                     in-process: its scheduler, caches and library)
                                       │ @serve.multiplexed: Serve prefers a replica that already loaded `key`
                                       ▼
                                     the same status, headers and bytes as `smoa serve`, plus `x-smoa-replica`

Use it from Python with :func:`build_app` and ``serve.run``::

    import ray
    from ray import serve
    from smoa.serve.ray import build_app, RayOptions

    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(config, RayOptions(replicas=2)), name="smoa", route_prefix="/")

or from the shell: ``smoa serve --library PATH --ray --replicas 2``.

Sharing one library. Replicas share a PostgreSQL catalog + S3 weights library (``storage_path="postgresql://..."``,
``weights_path="s3://..."``): each opens it, writes go through Postgres transactions, and each replica's routing
index catches up from the change log (lag: docs/scale.md). A local (SQLite) library is held by one process at a
time (directory lock), so with more than one replica each replica serves a private *snapshot copy* of it and the
ingress refuses writes (``POST/PATCH/DELETE /v1/adapters...``, ``/v1/optimize``) with 409 ``library_not_shared``;
with one replica the replica opens it in place and everything works.

Faults. A replica that dies while serving a request is replaced by the Serve controller; the ingress retries an
inference request (or a GET) once on another replica when nothing was sent to the client yet (always for
non-streaming requests, which are buffered) and otherwise answers 503 ``replica_unavailable`` (streams end with an
SSE error event). A write (upload, patch, delete, optimize) is never repeated: its 503 says so.
"""

# No `from __future__ import annotations` here: FastAPI reads the ingress methods' annotations at runtime in the
# Ray worker, where Serve's ingress class arrives pickled by value and string annotations could not be resolved.
import asyncio
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from smoa.errors import ConfigError
from smoa.serve.asgi_call import ForwardedRequest, Lifespan, ResponseHead, call_asgi
from smoa.serve.ray_affinity import (
    INFERENCE_PATHS,
    ROUTE_TTL_S,
    TTLCache,
    affinity_key,
    placement_of,
)

logger = logging.getLogger(__name__)

MAX_MIXTURES_PER_REPLICA = 64  # affinity keys a replica keeps "loaded" (Serve's per-replica LRU)
SHARED_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
WRITE_PATHS = ("/v1/adapters", "/v1/optimize")
REPLICA_HEADER = "x-smoa-replica"
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class RayOptions:
    """How the Ray deployment is laid out.

    Attributes:
        replicas: model replicas (each a full model + scheduler + library handle).
        replica_num_cpus: Ray CPUs reserved per replica (fractional so N replicas + ingress fit a small node).
        ingress_num_cpus: Ray CPUs reserved by the ingress.
        torch_threads: torch intra-op threads per replica (None: ``os.cpu_count() // replicas``, at least 1).
        retries: times a request is retried on another replica when its replica dies before answering.
        route_ttl_s: how long the ingress reuses a routed request's placement.
        max_ongoing_requests: requests a replica accepts at once (its scheduler batches them).
        max_body_bytes: the ingress refuses a larger body with 413 before reading it whole (None: the larger of the
            server's ``max_body_bytes`` and ``max_upload_bytes``; the replica applies the exact per-endpoint cap).
        app_factory: ``"module:function"`` building the single-process ASGI app from the config.
        ready_timeout_s: how long a replica may take to load its model and library.
        spill_threshold: requests a key's owner replica may have queued beyond the next one before the next one
            takes the key's requests (see :class:`AdapterAffinityRouter`).
        env_vars: environment of the replicas (e.g. ``AWS_ENDPOINT_URL`` and credentials for an S3 library);
            :func:`run_ray` passes the driver's ``AWS_*`` and ``SMOA_*`` variables.
    """

    replicas: int = 2
    replica_num_cpus: float = 0.5
    ingress_num_cpus: float = 0.1
    torch_threads: int | None = None
    retries: int = 1
    route_ttl_s: float = ROUTE_TTL_S
    max_ongoing_requests: int = 64
    max_body_bytes: int | None = None
    app_factory: str = "smoa.serve.app:build_app"
    ready_timeout_s: float = 600.0
    spill_threshold: int = 16
    env_vars: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ConfigError(f"`replicas` must be an int >= 1, got {self.replicas!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"`retries` must be an int >= 0, got {self.retries!r}")
        for name in ("replica_num_cpus", "ingress_num_cpus", "route_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}")
        if ":" not in self.app_factory:
            raise ConfigError(f"`app_factory` must be 'module:function', got {self.app_factory!r}")


# ---------------------------------------------------------------------------------------------- the config seam
def _library_of(config: Any) -> str | None:
    """The library location named by the serve config (``library`` or ``storage_path``)."""
    for name in ("library", "storage_path"):
        value = getattr(config, name, None)
        if value is not None:
            return str(value)
    return None


def _with_library(config: Any, path: str) -> Any:
    for name in ("library", "storage_path"):
        if getattr(config, name, None) is not None:
            return dataclasses.replace(config, **{name: path})
    raise ConfigError("the serve config names no library (`library` / `storage_path`)")


def shared_library_config(config: Any, url: str, weights_path: str | None = None) -> Any:
    """``config`` serving the shared library at ``url`` (``postgresql://...``), weights at ``weights_path`` (``s3://...``).

    ``ServeConfig`` keeps ``library`` as a filesystem path, so the URL is set after validation; ``create`` is on
    because a database "holds a library" once smoa has created its schema (first open).
    """
    if not is_shared_library(url):
        raise ConfigError(f"`library` must be a postgresql:// URL to be shared by replicas, got {url!r}")
    overrides = dict(getattr(config, "smoa_overrides", {}) or {})
    if weights_path is not None:
        overrides["weights_path"] = weights_path
    out = dataclasses.replace(config, smoa_overrides=overrides, create=True)
    out.library = url
    return out


def is_shared_library(location: str | None) -> bool:
    """Whether several processes can open this library at once (PostgreSQL catalog)."""
    return location is not None and location.startswith(SHARED_SCHEMES)


SNAPSHOT_PREFIX = "smoa-replica-"  # + "<pid>-<random>": a replica's copy of a local library, in the temp dir


def _snapshot(location: str) -> str:
    """Copy a local library directory (without its lock) to a private temp dir named after this process; returns
    the copy's path. The copies of replicas whose process is gone are removed first (:func:`sweep_snapshots`)."""
    sweep_snapshots()
    target = Path(tempfile.mkdtemp(prefix=f"{SNAPSHOT_PREFIX}{os.getpid()}-")) / "library"
    if Path(location).is_dir():  # else (`--create` of a new library): each replica starts its own, empty
        shutil.copytree(location, target, ignore=shutil.ignore_patterns("LOCK"))
    return str(target)


def sweep_snapshots(root: str | Path | None = None) -> list[Path]:
    """Remove the library copies (:func:`_snapshot`) of replica processes that no longer run; returns them.

    A replica removes its own copy when Ray shuts it down gracefully (``__del__``) or its interpreter exits; one
    killed outright (``serve.shutdown`` past its grace period, a crash) cannot, so the next replica started on
    the machine does. A copy whose process runs, or whose name carries no process id, is left alone.
    """
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(SNAPSHOT_PREFIX + "*"):
        pid, sep, _ = path.name[len(SNAPSHOT_PREFIX) :].partition("-")
        if sep and pid.isdigit() and not _process_runs(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _load_factory(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------- request router
def rendezvous_score(key: str, replica: str) -> int:
    """Highest-random-weight hash of ``(key, replica)``: the replica with the top score owns the key."""
    return int.from_bytes(hashlib.blake2b(f"{key}\x1f{replica}".encode(), digest_size=8).digest(), "big")


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ray Serve request router: every affinity key has one owner replica, kept for as long as it lives.

    For a request with key ``k`` (its ``multiplexed_model_id``)::

        owner(k) = the replica recorded for k, if it is still a candidate; otherwise (a new key, or its owner died)
                   the replica owning the fewest keys, ties broken by rendezvous hash(k, replica) — recorded
        ranks    = [[owner], the others]   (the others take k's requests only when the owner is full, or when its
                                            queue exceeds the next replica's by ``spill_threshold``)

    So keys are spread evenly from the first request and stay put (Serve's default multiplex routing sends new
    keys to "the replica with fewest models", a view that lags a burst of new keys by seconds, and pure hashing
    is uneven for a few keys). The table is per router (one per ingress replica) and holds the ``max_keys`` most
    recent keys. Requests without a key go to the less busy of two random replicas (power of two choices).
    """

    def initialize_state(self, spill_threshold: int = 16, max_keys: int = 100_000, **kwargs: Any) -> None:
        """``spill_threshold``: queued requests the owner may have beyond the next replica before spilling."""
        self.spill_threshold = spill_threshold
        self.max_keys = max_keys
        self.owners: OrderedDict[str, str] = OrderedDict()
        self.owned: Counter[str] = Counter()

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def owner_of(self, key: str, live: list[str]) -> str:
        """The owner replica id of ``key`` among ``live`` replica ids (assigning one if needed)."""
        owner = self.owners.get(key)
        if owner is None or owner not in live:
            if owner is not None:
                self.owned[owner] -= 1
            owner = min(live, key=lambda rid: (self.owned[rid], -rendezvous_score(key, rid)))
            self.owners[key] = owner
            self.owned[owner] += 1
            while len(self.owners) > self.max_keys:
                _, old = self.owners.popitem(last=False)
                self.owned[old] -= 1
        self.owners.move_to_end(key)
        return owner

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if len(candidate_replicas) < 2:
            return [candidate_replicas]
        if not key:
            return [random.sample(candidate_replicas, 2)]
        if not hasattr(self, "owners"):
            self.initialize_state()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owner = by_id[self.owner_of(key, list(by_id))]
        others = sorted((r for r in candidate_replicas if r is not owner), key=self._queue_len)
        if self._queue_len(owner) >= self._queue_len(others[0]) + self.spill_threshold:
            return [[others[0]], [owner, *others[1:]]]
        return [[owner], others]


# ---------------------------------------------------------------------------------------------- model replica
@dataclass(frozen=True)
class Ticket:
    """The first item a replica yields for a request: which replica took it (before any work is done)."""

    replica: str


def _weight_cache(stats: Any) -> dict[str, Any]:
    """``{"hits", "misses", ...}`` of the weight cache inside a ``/v1/stats`` answer (``cache`` or ``cache.weights``)."""
    cache = stats.get("cache", {}) if isinstance(stats, dict) else {}
    if isinstance(cache, dict) and isinstance(cache.get("weights"), dict):
        cache = cache["weights"]
    return {k: v for k, v in cache.items() if isinstance(v, (int, float))} if isinstance(cache, dict) else {}


class _Board:
    """What every replica last reported (a small Ray actor shared by the ingress and the replicas)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, stats: dict[str, Any]) -> None:
        self.reports[replica] = {**stats, "reported_at": time.time()}

    def all(self) -> dict[str, dict[str, Any]]:
        return self.reports


def replica_board(app_name: str) -> Any:
    """The board actor of Serve application ``app_name`` (created on first use, lives as long as Ray)."""
    import ray

    return ray.remote(_Board).options(name=f"smoa-board-{app_name}", namespace="smoa", get_if_exists=True,
                                      lifetime="detached", num_cpus=0).remote()  # fmt: skip


async def _collect(items: AsyncIterator[Any]) -> tuple[ResponseHead, bytes]:
    head: ResponseHead | None = None
    chunks: list[bytes] = []
    async for item in items:
        if isinstance(item, ResponseHead):
            head = item
        else:
            chunks.append(item)
    assert head is not None  # call_asgi always yields a head first or raises
    return head, b"".join(chunks)


@serve.deployment(name="SmoaModelReplica")
class SmoaModelReplica:
    """One model replica: the single-process smoa server running in-process, fed by the ingress."""

    async def __init__(self, config: Any, options: RayOptions) -> None:  # type: ignore[misc]  # Ray: async init
        import torch

        self._reporter: asyncio.Task[None] | None = None
        self.snapshot = False
        torch.set_num_threads(options.torch_threads or max(1, (os.cpu_count() or 1) // options.replicas))
        location = _library_of(config)
        self.snapshot = options.replicas > 1 and location is not None and not is_shared_library(location)
        self.config = _with_library(config, _snapshot(location)) if self.snapshot and location else config
        if self.snapshot:  # removed at the interpreter's exit too, if Ray does not call __del__
            weakref.finalize(self, shutil.rmtree, Path(_library_of(self.config) or "").parent, True)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = _load_factory(options.app_factory)(self.config)
        self.lifespan = Lifespan(self.app)
        await self.lifespan.startup()
        await self._wait_ready(options.ready_timeout_s)
        self.counters = {"requests": 0, "completed": 0, "mixture_loads": 0, "mixture_hits": 0}
        self.board = replica_board(serve.get_replica_context().app_name)
        self._reported: tuple[int, int] = (0, 0)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("smoa replica %s ready (library %s)", self.replica_id, _library_of(self.config))

    async def _wait_ready(self, timeout_s: float) -> None:
        """Wait until the server's ``GET /health`` answers 200 (model and library loaded); raise if loading failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            head, body = await _collect(call_asgi(self.app, ForwardedRequest("GET", "/health"), self.lifespan.state))
            if head.status == 200:
                return
            state = json.loads(body or b"{}")
            if state.get("status") == "error" or time.monotonic() > deadline:
                raise RuntimeError(f"smoa replica failed to load: {state.get('error') or 'timed out'}")
            await asyncio.sleep(0.1)

    async def _report_forever(self) -> None:
        """Every 0.25 s after new requests: this replica's counters and cache statistics to the board."""
        while True:
            await asyncio.sleep(0.25)
            marker = (self.counters["requests"], self.counters["completed"])
            if marker == self._reported:
                continue
            self._reported = marker
            try:
                self.board.report.remote(self.replica_id, await self.stats())
            except Exception:
                logger.exception("smoa replica %s: stats report failed", self.replica_id)

    @serve.multiplexed(max_num_models_per_replica=MAX_MIXTURES_PER_REPLICA)
    async def load_mixture(self, key: str) -> str:
        """Mark the adapters of ``key`` resident here (their weights fill this replica's cache on first use)."""
        self.counters["mixture_loads"] += 1
        return key

    async def stats(self) -> dict[str, Any]:
        """This replica's counters and its weight cache's hits/misses (the server's ``GET /v1/stats`` numbers)."""
        try:
            cache = _weight_cache(await asyncio.to_thread(self.app.state.serving.stats))
        except Exception:  # noqa: BLE001 - not ready or draining: report the counters alone
            cache = {}
        return {"replica": self.replica_id, **self.counters, "weight_cache": cache}

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Any]:
        """Serve one forwarded request; yields a :class:`ResponseHead` then the body chunks."""
        key = serve.get_multiplexed_model_id()
        if key:
            before = self.counters["mixture_loads"]
            await self.load_mixture(key)
            self.counters["mixture_hits"] += int(self.counters["mixture_loads"] == before)
        self.counters["requests"] += 1
        yield Ticket(self.replica_id)
        try:
            async for item in call_asgi(self.app, request, self.lifespan.state):
                if isinstance(item, ResponseHead):
                    item.headers.append((REPLICA_HEADER, self.replica_id))
                    item.replica = self.replica_id
                yield item
        finally:
            self.counters["completed"] += 1

    async def route(self, query: dict[str, Any]) -> list[str]:
        """Route a query as ``POST /v1/route`` would (``query``, ``metadata``, ``strategy``); the adapter ids."""
        from smoa.serve.protocol import RouteRequest

        try:
            route = await asyncio.to_thread(self.app.state.serving.route, RouteRequest(**query))
        except Exception:  # noqa: BLE001 - a query the server would refuse: no placement, the request gets the error
            return []
        return [str(i) for i in route.get("adapter_ids", [])]

    async def __del__(self) -> None:
        if self._reporter is None:  # the constructor failed: nothing was started
            return
        self._reporter.cancel()
        await self.lifespan.shutdown()
        if self.snapshot:
            shutil.rmtree(Path(_library_of(self.config) or "").parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- ingress
_ingress_app = FastAPI(title="smoa on Ray Serve", openapi_url=None, docs_url=None, redoc_url=None)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _error(status: int, message: str, code: str, err_type: str = "service_unavailable", **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _replica_died_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    from ray.serve.exceptions import ReplicaUnavailableError

    return (rex.RayActorError, rex.ActorUnavailableError, ReplicaUnavailableError)


def _response(head: ResponseHead, body: bytes) -> Response:
    response = Response(content=body, status_code=head.status)
    _copy_headers(response, head)
    return response


def _copy_headers(response: Response, head: ResponseHead) -> None:
    kept = [(k, v) for k, v in response.raw_headers if k.decode("latin-1") in ("content-length",)]
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers if k not in _HOP_HEADERS]
    response.raw_headers = kept + extra


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``cap`` bytes (the rest is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _base_names(config: Any) -> list[str]:
    """The served base-model name (``model`` = that name means "no adapter"), as ``SmoaServing`` names it."""
    from smoa.serve.serving import DEFAULT_MODEL_NAME

    if getattr(config, "model_name", None):
        return [str(config.model_name)]
    model_dir = getattr(config, "model_dir", None)
    return [Path(str(model_dir)).name] if model_dir else [DEFAULT_MODEL_NAME]


@serve.deployment(name="SmoaIngress")
@serve.ingress(_ingress_app)
class SmoaIngress:
    """Reads each request, places it by adapter affinity, forwards it to a model replica, relays the answer."""

    def __init__(self, replica: Any, config: Any, options: RayOptions) -> None:
        self.replica = replica
        self.options = options
        self.read_only = options.replicas > 1 and not is_shared_library(_library_of(config))
        self.max_body = options.max_body_bytes or max(int(getattr(config, "max_body_bytes", 0) or 0),
                                                      int(getattr(config, "max_upload_bytes", 0) or 0), 1 << 20)
        self.base_names = frozenset(_base_names(config))
        self.routes = TTLCache(ttl_s=options.route_ttl_s)
        self.replica_seen: dict[str, dict[str, Any]] = {}
        self.affinity = True
        self.died = _replica_died_errors()

    @_ingress_app.get("/ray/replicas")
    async def replicas(self) -> dict[str, Any]:
        """Each replica's last report (counters, weight-cache hits/misses) and the ingress's view (in flight, died)."""
        board = replica_board(serve.get_replica_context().app_name)
        reports = await board.all.remote()
        merged = {rid: {**reports.get(rid, {}), **self.replica_seen.get(rid, {})} for rid in {*reports, *self.replica_seen}}
        return {"replicas": merged, "route_cache": {"hits": self.routes.hits, "misses": self.routes.misses},
                "affinity": self.affinity}

    @_ingress_app.post("/ray/affinity")
    async def set_affinity(self, request: Request) -> dict[str, Any]:
        """Turn affinity placement on or off (``{"enabled": false}``: plain load balancing, for comparisons)."""
        self.affinity = bool((await request.json()).get("enabled", True))
        return {"enabled": self.affinity}

    @_ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        """Forward any request of the smoa HTTP API to a model replica chosen by affinity."""
        body = await _read_capped(request, self.max_body)
        if body is None:
            return _error(413, f"request body exceeds {self.max_body} bytes", "body_too_large",
                          "invalid_request_error")
        method, url_path = request.method, request.url.path
        if self.read_only and method in ("POST", "PATCH", "DELETE", "PUT") and url_path.startswith(WRITE_PATHS):
            return _error(409, "this deployment serves snapshot copies of a local library; writes need a shared "
                          "(PostgreSQL) library", "library_not_shared", "invalid_request_error")
        placement = placement_of(method, url_path, body, self.base_names)
        key = await self._key(placement) if self.affinity else ""
        forwarded = ForwardedRequest(
            method=method,
            path=url_path,
            query_string=request.url.query.encode(),
            headers=tuple((k.lower(), v) for k, v in request.headers.items()),
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        retry = method in ("GET", "HEAD") or url_path in INFERENCE_PATHS  # never repeat a write
        return await self._dispatch(forwarded, key, placement.stream, self.options.retries if retry else 0)

    async def _key(self, placement: Any) -> str:
        if placement.kind == "explicit":
            return affinity_key(placement.adapter_ids)
        if placement.kind != "routed" or placement.query is None:
            return ""
        cache_key = placement.query.cache_key()
        cached = self.routes.get(cache_key)
        if cached is not None:
            return cached
        query = {"query": placement.query.text, "metadata": placement.query.metadata, "strategy": placement.query.strategy}
        try:
            ids = await self.replica.route.remote({k: v for k, v in query.items() if v is not None})
        except self.died:
            return ""
        key = affinity_key(ids)
        self.routes.put(cache_key, key)
        return key

    def _handle(self, key: str) -> Any:
        return self.replica.options(stream=True, multiplexed_model_id=key) if key else self.replica.options(stream=True)

    async def _dispatch(self, request: ForwardedRequest, key: str, stream: bool, retries: int) -> Response:
        last: BaseException | None = None
        for _attempt in range(1 + retries):
            gen = self._handle(key).forward.remote(request)
            replica = ""
            try:
                replica = (await gen.__anext__()).replica
                self._start(replica)
                head = await gen.__anext__()
                if stream:
                    return self._streaming(head, gen)
                chunks = [chunk async for chunk in gen]
            except self.died as exc:
                logger.warning("replica %s died while serving %s %s: %s", replica, request.method, request.path, exc)
                last = exc
                self._end(replica, died=True)
                continue
            self._end(replica)
            return _response(head, b"".join(chunks))
        what = f"and {retries} retry failed" if retries else "(a write is never retried: check whether it happened)"
        return _error(503, f"the model replica serving this request died {what}: {type(last).__name__}",
                      "replica_unavailable", **{"Retry-After": "1"})

    def _start(self, replica: str) -> None:
        entry = self.replica_seen.setdefault(replica, {"served": 0, "in_flight": 0, "died": 0})
        entry["in_flight"] += 1
        entry["last_seen"] = time.time()

    def _end(self, replica: str, died: bool = False) -> None:
        entry = self.replica_seen.get(replica)
        if entry is None:
            return
        entry["in_flight"] -= 1
        entry["served"] += 1
        entry["died"] += int(died)

    def _streaming(self, head: ResponseHead, gen: Any) -> StreamingResponse:
        died, replica = self.died, head.replica

        async def relay() -> AsyncIterator[bytes]:
            failed = False
            try:
                async for chunk in gen:
                    yield chunk
            except died as exc:
                failed = True
                err = {"error": {"message": f"model replica died mid-stream: {type(exc).__name__}",
                                 "type": "service_unavailable", "param": None, "code": "replica_unavailable"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                gen.cancel()
                self._end(replica, died=failed)

        response = StreamingResponse(relay(), status_code=head.status)
        _copy_headers(response, head)
        return response


# ---------------------------------------------------------------------------------------------- entry points
def build_app(config: Any, options: RayOptions | None = None, *, replicas: int | None = None) -> Any:
    """The smoa Ray Serve application (ingress + model replicas) for ``serve.run``.

    Args:
        config: the serve configuration, as for ``smoa.serve.app.build_app`` (picklable: it travels to replicas).
        options: layout of the deployment (:class:`RayOptions`); default 2 replicas.
        replicas: shorthand overriding ``options.replicas``.

    Returns:
        A bound Serve application: ``serve.run(build_app(config), name="smoa", route_prefix="/")``.
    """
    options = options or RayOptions()
    if replicas is not None:
        options = dataclasses.replace(options, replicas=replicas)
    replica = SmoaModelReplica.options(  # type: ignore[attr-defined]  # a Serve Deployment
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_num_cpus,
                           **({"runtime_env": {"env_vars": dict(options.env_vars)}} if options.env_vars else {})},
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=2.0,
        max_constructor_retry_count=3 * options.replicas,
        graceful_shutdown_timeout_s=30.0,
        request_router_config={"request_router_class": AdapterAffinityRouter,
                               "request_router_kwargs": {"spill_threshold": options.spill_threshold}},
    ).bind(config, options)
    return SmoaIngress.options(  # type: ignore[misc,operator]  # a Serve Deployment
        ray_actor_options={"num_cpus": options.ingress_num_cpus}, max_ongoing_requests=4 * options.max_ongoing_requests
    ).bind(replica, config, options)


def init_local_ray(num_cpus: int | None = None, object_store_mb: int = 200) -> None:
    """Start (or join) a local Ray with no dashboard, no usage stats and a small object store."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=object_store_mb * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )


def run_ray(config: Any, options: RayOptions, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True) -> None:
    """Start a local Ray, deploy :func:`build_app` on ``host:port``; block until SIGINT/SIGTERM when ``blocking``.

    On the signal, Serve shuts down gracefully: each replica drains (in-flight requests finish) and closes its
    library, then Ray stops.
    """
    import signal
    import threading

    stop = threading.Event()
    if blocking:  # installed first, so a signal that arrives while deploying is not lost
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "SMOA_"))}
    options = dataclasses.replace(options, env_vars={**env, **options.env_vars})
    init_local_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, options), name="smoa", route_prefix="/", blocking=False)
    logger.info("smoa on Ray Serve: http://%s:%d (%d replicas)", host, port, options.replicas)
    if not blocking:
        return
    try:
        while not stop.wait(0.5):
            pass
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
