"""What does a library cost beyond one machine, and how fast are the shared backends?

One function per measurement; each returns rows for one table (printed at the end, and as JSON with --json):

* ``catalog_ops``     catalog operations/s on SQLite (a file) vs PostgreSQL (a local server): bulk create,
                      one-adapter create/update/delete transactions, point reads, change-log catch-up reads.
* ``catch_up_lag``    another *process*'s commit -> this process sees the new generation and has read the
                      changed rows from the change log (p50 / p99 / max over many writes). PostgreSQL: NOTIFY
                      (+1 s poll fallback); SQLite: what a poller would see (one `read_generation` per 10 ms).
* ``route_catch_up_lag`` the same through the core: another process creates an adapter; the first route here
                      that names it (PostgreSQL + S3).
* ``cold_load``       one adapter's weight bytes from local disk vs from S3 (moto server on 127.0.0.1) vs the S3
                      store's local cache tier, checksum verified, per size class.
* ``bytes_per_adapter`` RAM (core directory entry + routing key), catalog bytes, object-store bytes per adapter:
                      the measured inputs of the capacity model in docs/scale.md.

The Ray Serve parts (throughput with 1 vs 2 replicas, index shards as actors) are further functions in this
file, registered in MEASUREMENTS the same way.

    .venv/bin/python benchmarks/bench_scale.py                  # everything, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --quick          # smaller counts, ~1 minute
    .venv/bin/python benchmarks/bench_scale.py --only cold_load catch_up_lag
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "backends"))

import local_services

Row = dict[str, Any]


class Services:
    """The PostgreSQL server and S3 endpoint the measurements share (started on first use)."""

    def __init__(self) -> None:
        self._pg: local_services.LocalPostgres | None = None
        self._s3: local_services.LocalS3 | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="smoa-bench-scale-"))

    @property
    def pg(self) -> local_services.LocalPostgres:
        if self._pg is None:
            self._pg = local_services.LocalPostgres().start()
        return self._pg

    @property
    def s3(self) -> local_services.LocalS3:
        if self._s3 is None:
            self._s3 = local_services.LocalS3().start()
            os.environ.update(self._s3.env())
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
        if self._pg is not None:
            self._pg.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _rows(start: int, n: int, nbytes: int = 1200) -> list[Any]:
    from helpers import make_row

    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        row = make_row(i, rng, data=rng.randbytes(nbytes))
        row.id = f"ad_{i:012d}"
        out.append(row)
    return out


def _catalog(kind: str, svc: Services, tag: str) -> Any:
    from helpers import open_catalog

    if kind == "sqlite":
        d = svc.tmp / f"{tag}-sqlite"
        d.mkdir(parents=True, exist_ok=True)
        return open_catalog("sqlite", d / "catalog.sqlite3")
    return open_catalog("postgres", svc.pg.create_database())


def _rate(n: int, fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# == measurements ===================================================================================================
def catalog_ops(svc: Services, quick: bool) -> list[Row]:
    """Catalog operations/s, SQLite vs PostgreSQL (same machine; PostgreSQL over TCP on 127.0.0.1)."""
    bulk_n, single_n = (5_000, 200) if quick else (50_000, 1_000)
    out = []
    for kind in ("sqlite", "postgres"):
        cat = _catalog(kind, svc, "ops")
        try:
            out.append({"backend": kind, **_ops_rates(cat, bulk_n, single_n)})
        finally:
            cat.close()
    return out


def _ops_rates(cat: Any, bulk_n: int, single_n: int) -> Row:
    """Operations/s of one catalog: bulk create, then ``single_n`` of each single operation."""
    rows = _rows(0, bulk_n)
    bulk = _rate(bulk_n, lambda: [cat.insert_many(rows[i : i + 1000]) for i in range(0, bulk_n, 1000)])
    singles = _rows(bulk_n, single_n)
    create = _rate(single_n, lambda: [cat.insert_many([r]) for r in singles])
    keys = random.Random(1).sample(range(1, bulk_n + 1), single_n)
    ids = [f"ad_{k - 1:012d}" for k in keys]
    read = _rate(single_n, lambda: [cat.get(i) for i in ids])
    weights = _rate(single_n, lambda: [cat.read_weights(k) for k in keys])
    update = _rate(single_n, lambda: [cat.update_fields(k, description="changed") for k in keys])
    gen = cat.generation - single_n
    catch = _rate(single_n, lambda: list(cat.directory_rows(cat.changes_since(gen) or [])))
    delete = _rate(single_n, lambda: [cat.delete([k]) for k in keys])
    return {"bulk create /s": bulk, "create txn /s": create, "get /s": read, "read_weights /s": weights,
            "update txn /s": update, "delete txn /s": delete, "catch-up rows /s": catch}  # fmt: skip


_LAG_WRITER = r"""
import sys, time
sys.path.insert(0, {helpers!r})
from helpers import make_row, open_catalog
cat = open_catalog({kind!r}, {where!r}, **({kw!r}))
for i in range({n}):
    time.sleep(0.02)
    row = make_row(10_000 + i); row.id = "lag_%d" % i
    cat.insert_many([row])
    print(time.time(), cat.generation, flush=True)
cat.close()
"""


def catch_up_lag(svc: Services, quick: bool) -> list[Row]:
    """Commit in one process -> seen (new generation) and caught up (changed rows read) in another."""
    n = 40 if quick else 150
    out = []
    for kind in ("sqlite", "postgres"):
        if kind == "sqlite":
            d = svc.tmp / "lag-sqlite"
            d.mkdir(parents=True, exist_ok=True)
            where: Any = str(d / "catalog.sqlite3")
            kw: dict[str, Any] = {}
        else:
            where, kw = svc.pg.create_database(), {"listen": False}
        from helpers import open_catalog

        reader = open_catalog(kind, where)
        code = _LAG_WRITER.format(helpers=str(ROOT / "tests" / "backends"), kind=kind, where=where, kw=kw, n=n)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        applied = reader.generation
        seen: dict[int, float] = {}
        while proc.poll() is None or len(seen) < n:
            if kind == "sqlite":
                time.sleep(0.01)  # a poller: one SQL read per 10 ms
                reader.read_generation()
            else:
                time.sleep(0.0005)  # the listener thread raises `generation`; this loop only reads the attribute
            g = reader.generation
            if g > applied:
                keys = reader.changes_since(applied) or []
                list(reader.directory_rows(keys))
                now = time.time()
                for gg in range(applied + 1, g + 1):
                    seen[gg] = now
                applied = g
            if proc.poll() is not None and len(seen) >= n:
                break
            if proc.poll() is not None and time.time() - max(seen.values(), default=time.time()) > 5:
                break
        commits = {int(g): float(t) for t, g in (line.split() for line in proc.stdout.read().splitlines())}  # type: ignore[union-attr]
        reader.close()
        lags = [(seen[g] - t) * 1000 for g, t in commits.items() if g in seen]
        out.append({"backend": kind, "mechanism": "poll every 10 ms" if kind == "sqlite" else "LISTEN/NOTIFY",
                    "writes": len(lags), "lag p50 ms": pct(lags, 0.5), "lag p99 ms": pct(lags, 0.99),
                    "lag max ms": max(lags)})  # fmt: skip
    return out


_ROUTE_WRITER = r"""
import sys, time
sys.path.insert(0, {helpers!r})
from helpers import open_core, spec
core = open_core({backend!r})
for i in range({n}):
    time.sleep(0.05)
    ad = core.create(spec(i, tag="lag%d" % i))
    print(time.time(), i, ad.id, flush=True)
core.close()
"""


def route_catch_up_lag(svc: Services, quick: bool) -> list[Row]:
    """Through the core: an adapter created by another *process* -> the first route here that returns it.

    PostgreSQL + S3 only (a SQLite library is opened by one process at a time). The reader routes the new
    adapter's tag in a loop; the lag is from the writer's acknowledged create to the first route naming it.
    """
    from helpers import open_core

    n = 20 if quick else 60
    backend = {"storage_path": svc.pg.create_database(), "weights_path": f"s3://{svc.s3.create_bucket()}/lag",
               "name": "postgres+s3", "cache_dir": str(svc.tmp / "route-lag-tier")}  # fmt: skip
    reader = open_core(backend)
    code = _ROUTE_WRITER.format(helpers=str(ROOT / "tests" / "backends"), backend=backend, n=n)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lags = []
    for line in proc.stdout:
        t_commit, i, aid = line.split()
        while aid not in reader.route(f"topic {int(i) % 5}", {"domain": f"lag{i}"}, "task_based", 1).adapter_ids:
            time.sleep(0.0005)
        lags.append((time.time() - float(t_commit)) * 1000)
    proc.wait()
    reader.close()
    return [{"backend": "postgres+s3 (core)", "mechanism": "LISTEN/NOTIFY -> change log -> index", "creates": len(lags),
             "lag p50 ms": pct(lags, 0.5), "lag p99 ms": pct(lags, 0.99), "lag max ms": max(lags)}]  # fmt: skip


SIZES = {"nano (12 KB)": 12_000, "small (1 MB)": 1_000_000, "medium (16 MB)": 16_000_000}


def cold_load(svc: Services, quick: bool) -> list[Row]:
    """One adapter's bytes: local FileStore vs S3 (moto) vs the S3 store's local cache tier, sha256 checked."""
    from smoa.storage.files import FileStore
    from smoa.storage.s3 import S3WeightStore

    reps = {"nano (12 KB)": 200, "small (1 MB)": 30, "medium (16 MB)": 5 if quick else 10}
    if quick:
        reps = {k: max(3, v // 4) for k, v in reps.items()}
    url = f"s3://{svc.s3.create_bucket()}/bench"
    local = FileStore(svc.tmp / "cold-local")
    out = []
    for label, size in SIZES.items():
        blobs = [os.urandom(size) for _ in range(min(reps[label], 20))]
        rels = []
        s3_plain = S3WeightStore(url)
        for b in blobs:
            d = hashlib.sha256(b).hexdigest()
            rels.append(local.write("weights/hot", d, b))
            s3_plain.write("weights/hot", d, b)
        cache_dir = svc.tmp / f"tier-{size}"
        s3_tier = S3WeightStore(url, cache_dir=cache_dir)
        for r in rels:  # warm the local tier (first read downloads)
            s3_tier.read(r, name="x")
        row: Row = {"size": label}
        for name, store in (("local disk", local), ("S3 (moto, no tier)", s3_plain), ("S3 local tier hit", s3_tier)):
            read = functools.partial(store.read, name="x")
            times = []
            for i in range(reps[label]):
                r = rels[i % len(rels)]
                t = time.perf_counter()
                data = read(r)
                if name == "local disk":  # FileStore does not verify; the library does: charge it here too
                    hashlib.sha256(data).hexdigest()
                times.append((time.perf_counter() - t) * 1000)
            row[f"{name} p50 ms"] = statistics.median(times)
        row["S3 MB/s"] = size / 1e6 / (row["S3 (moto, no tier) p50 ms"] / 1000)
        out.append(row)
    return out


def bytes_per_adapter(svc: Services, quick: bool) -> list[Row]:
    """Per-adapter RAM (directory entry + routing key), catalog bytes and object bytes, nano adapters
    (~3 KB of safetensors: rank 2, float16), 384-d float32 routing keys."""
    from smoa.storage.s3 import S3WeightStore

    n = 10_000 if quick else 50_000
    dim, nbytes = 384, 3_000
    out = []
    for kind, inline in (("sqlite", True), ("postgres", True), ("postgres", False)):
        cat = _catalog(kind, svc, f"bytes-{inline}")
        try:
            for i in range(0, n, 5_000):
                rows = _rows(i, 5_000, nbytes=nbytes)
                for r in rows:
                    r.embedding = os.urandom(4 * dim)
                    if not inline:  # weights in the object store: the row names the object
                        r.file, r.blob = f"weights/hot/{r.checksum[:2]}/{r.checksum}", None
                cat.insert_many(rows)
            cat.compact()
            if kind == "sqlite":
                size = sum(p.stat().st_size for p in cat.path.parent.glob("catalog.sqlite3*"))
            else:
                size = cat.size_bytes()
            ram = _directory_ram(cat, dim)
        finally:
            cat.close()
        out.append({"catalog": kind, "weights": "inline" if inline else "object store", "adapters": n,
                    "catalog bytes/adapter": size / n, "RAM bytes/adapter (directory + key)": ram / n,
                    "object bytes/adapter": 0.0 if inline else float(nbytes)})  # fmt: skip
    store = S3WeightStore(f"s3://{svc.s3.create_bucket()}/bytes")
    payloads = [os.urandom(nbytes) for _ in range(100)]
    for b in payloads:
        store.write("weights/hot", hashlib.sha256(b).hexdigest(), b)
    out[-1]["object bytes/adapter"] = store.stored_bytes() / len(payloads)  # as the store lists them
    return out


def _directory_ram(cat: Any, dim: int) -> int:
    """Python heap bytes of what a process keeps per adapter: the core's directory (id -> entry, key -> entry)
    and the routing keys as one float32 matrix (the flat index's layout), measured with tracemalloc."""
    import tracemalloc

    import numpy as np

    gc.collect()
    tracemalloc.start()
    by_id = {r.id: r for r in cat.directory_rows()}
    by_key = {r.key: r for r in by_id.values()}
    keys = [r.embedding for r in cat.routing_rows()]
    matrix = np.frombuffer(b"".join(keys), np.float32).reshape(len(keys), dim).copy()
    del keys
    gc.collect()
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del by_id, by_key, matrix
    return used


# == Ray Serve: replicas and index shards (helper E) ================================================================
def _bench_serve_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _load(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[float, list[float], int, set[str]]:
    """``bodies`` sent by ``clients`` concurrent clients; (wall s, latencies s, completion tokens, replicas seen)."""
    import asyncio

    import httpx

    async def run() -> tuple[float, list[float], int, set[str]]:
        queue = list(bodies)
        lat: list[float] = []
        tokens = 0
        replicas: set[str] = set()
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def worker() -> None:
                nonlocal tokens
                while queue:
                    body = queue.pop()
                    t = time.perf_counter()
                    r = await client.post("/v1/completions", json=body)
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)
                    tokens += r.json()["usage"]["completion_tokens"]
                    replicas.add(r.headers.get("x-smoa-replica", "-"))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return time.perf_counter() - t0, lat, tokens, replicas

    return asyncio.run(run())


def ray_throughput(svc: Services, quick: bool) -> list[Row]:
    """SmolLM2-135M behind Ray Serve: the same load on 1 replica vs 2 replicas.

    Each request: an explicit k = 3 mixture out of 8 (so affinity keeps each mixture on one replica), greedy,
    ``ignore_eos``; 8 (quick) or 16 concurrent clients. Rows: the single-process server (uvicorn, no Ray, one torch
    thread) as the reference, then Ray Serve with 1 replica x 1 thread, 1 replica x 2 threads, 2 replicas x 1
    thread (the machine's 2 cores either way).
    """
    import threading

    import uvicorn
    from ray import serve

    from smoa.models import load_default_base_model
    from smoa.serve.app import build_app as build_http_app
    from smoa.serve.config import ServeConfig
    from smoa.serve.ray import RayOptions, build_app, init_local_ray

    bs = _bench_serve_module()
    model, _ = load_default_base_model()
    weights = bs.make_adapters(model, 24, rank=8)
    del model
    library = svc.tmp / "ray-throughput-lib"
    ids = bs.build_library(library, weights)
    mixtures = [[{"id": ids[3 * m + j], "weight": 1.0 / 3} for j in range(3)] for m in range(8)]
    n_requests, tokens, clients = (24, 16, 8) if quick else (64, 32, 16)
    bodies = [{"model": "smoa", "adapters": mixtures[i % 8], "prompt": f"Question {i}: explain the tides",
               "max_tokens": tokens, "temperature": 0, "ignore_eos": True} for i in range(n_requests)]  # fmt: skip
    config = ServeConfig(library=library, encoder="hash", max_batch=16)
    rows: list[Row] = []

    def record(setup: str, url: str) -> None:
        _load(url, bodies[:4], 4)  # warm-up: weights into the caches, first-call costs
        wall, lat, n_tokens, replicas = _load(url, bodies, clients)
        rows.append({"setup": setup, "replicas seen": len(replicas), "requests": len(bodies), "clients": clients,
                     "tokens/s": n_tokens / wall, "req/s": len(bodies) / wall, "latency p50 s": pct(lat, 0.5),
                     "latency p99 s": pct(lat, 0.99)})  # fmt: skip

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = local_services.free_port()
    server = uvicorn.Server(uvicorn.Config(build_http_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_health(f"http://127.0.0.1:{port}")
        record("single process (uvicorn, no Ray) x 1 thread", f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=120)
        torch.set_num_threads(threads)
    init_local_ray(num_cpus=2)
    port = local_services.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for replicas, per_replica in ((1, 1), (1, 2), (2, 1)):
            options = RayOptions(replicas=replicas, torch_threads=per_replica, replica_num_cpus=0.5)
            name = f"bench{replicas}x{per_replica}"
            serve.run(build_app(config, options), name=name, route_prefix="/")
            record(f"Ray Serve, {replicas} replica(s) x {per_replica} thread(s)", f"http://127.0.0.1:{port}")
            serve.delete(name)
    finally:
        serve.shutdown()
    return rows


def _wait_health(url: str, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def ray_index_shards(svc: Services, quick: bool) -> list[Row]:
    """The routing index sharded over Ray actors (2 shards, HNSW-SQ8, 384-d keys): RAM per key and fan-out latency.

    Keys are random unit vectors (a routing key's size and the search cost do not depend on what it encodes).
    Per size: bulk build time (both shards in parallel), index bytes and actor RSS per shard, and the latency of
    one query fanned out to both shards and merged (k = 5), p50/p99 over 300 queries.
    """
    import numpy as np
    import ray

    from smoa.serve.ray import init_local_ray
    from smoa.serve.ray_shards import ShardedIndex

    init_local_ray(num_cpus=2)
    rows: list[Row] = []
    dim, shards = 384, 2
    sizes = (20_000,) if quick else (50_000, 100_000)
    rng = np.random.default_rng(0)
    for per_shard in sizes:
        n = per_shard * shards
        keys = np.arange(n, dtype=np.int64)
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = ShardedIndex(dim, shards, actor_options={"num_cpus": 0})
        try:
            empty_rss = max(s["rss_bytes"] for s in index.stats())
            t = time.perf_counter()
            index.build(keys, vectors)
            build_s = time.perf_counter() - t
            del vectors
            stats = index.stats()
            queries = rng.standard_normal((300, dim), dtype=np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            lat = []
            for q in queries:
                t = time.perf_counter()
                index.search(q[None, :], 5)
                lat.append((time.perf_counter() - t) * 1000)
            rows.append({"keys/shard": per_shard, "shards": shards, "kind": stats[0]["kind"], "build s": build_s,
                         "index B/key": stats[0]["index_bytes"] / per_shard,
                         "actor RSS B/key": (stats[0]["rss_bytes"] - empty_rss) / per_shard,
                         "fan-out p50 ms": pct(lat, 0.5), "fan-out p99 ms": pct(lat, 0.99)})  # fmt: skip
        finally:
            index.close()
    gc.collect()
    ray.shutdown()
    return rows


MEASUREMENTS: dict[str, Callable[[Services, bool], list[Row]]] = {
    "catalog_ops": catalog_ops,
    "catch_up_lag": catch_up_lag,
    "route_catch_up_lag": route_catch_up_lag,
    "cold_load": cold_load,
    "bytes_per_adapter": bytes_per_adapter,
    "ray_throughput": ray_throughput,
    "ray_index_shards": ray_index_shards,
}


def print_table(title: str, rows: list[Row]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = [lambda v: f"{v:,.1f}" if isinstance(v, float) else str(v)]
    cells = [[fmt[0](r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n## {title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    p.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), help="run only these measurements")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    svc = Services()
    results: dict[str, list[Row]] = {}
    try:
        for name in args.only or list(MEASUREMENTS):
            t = time.time()
            results[name] = MEASUREMENTS[name](svc, args.quick)
            print_table(f"{name} ({time.time() - t:.0f} s)", results[name])
    finally:
        svc.close()
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"{os.cpu_count()} CPUs; command: {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
