"""What do Python's full garbage collections cost a loaded `smoa serve`, and what does freezing (the default) save?

A loaded server holds ~460K objects the collector tracks (torch's and transformers' modules, the model, the
library). A full (generation-2) collection walks all of them with the GIL held, so every request in the process
waits for it. ``ServeConfig.freeze_gc`` (default on; ``smoa serve --no-freeze-gc`` turns it off) moves them into
the permanent generation once loaded (``gc.freeze``), where no collection walks them.

Each mode runs in its own interpreter (the collector's state is per process), the order alternating per round:
SmolLM2-135M-Instruct behind the real server (uvicorn on 127.0.0.1, in a thread), 24 adapters, 16 clients
streaming routed k = 3 completions of ``--tokens`` tokens, and beside them one client sending ``POST /v1/route``
every 5 ms (its first 20 not counted: they load the adapters' weights). Every collection is timed by a
``gc.callbacks`` hook in the server's process. Prints, per mode: objects a full collection walks, collections
per generation, the slowest and the summed generation-2 ms, the routes' p50 / p99 / max ms at the client and in
the server (``latency_ms``: routing and weight resolution), the streams' inter-token latency p99 / max ms, and one
forced ``gc.collect()`` at the end.

    .venv/bin/python benchmarks/bench_gc.py              # 2 rounds, ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_gc.py --rounds 1 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_serve  # noqa: E402

PROBE_GAP_S = 0.005  # the route client's pause between requests (back to back, it starved the streams)
WARM_ROUTES = 20  # the first routes load the adapters' weights while 16 streams start (up to ~0.8 s): not counted
MODES = {"frozen (default)": True, "not frozen (--no-freeze-gc)": False}


class Collections:
    """Wall ms of every collection of this process, per generation (a ``gc.callbacks`` hook)."""

    def __init__(self) -> None:
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms[info["generation"]].append((time.perf_counter() - self._start) * 1e3)


async def route_probe(url: str, stop: asyncio.Event) -> tuple[list[float], list[float]]:
    """``POST /v1/route`` every :data:`PROBE_GAP_S` until ``stop``: each request's wall ms at the client and the
    server's own ``latency_ms`` (routing and weight resolution), past the first :data:`WARM_ROUTES`."""
    wall, server = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        i = 0
        while not stop.is_set():
            body = {"query": bench_serve.prompts(1, offset=i)[0]}
            t = time.perf_counter()
            r = await client.post(url + "/v1/route", json=body)
            ms = (time.perf_counter() - t) * 1e3
            r.raise_for_status()
            if i >= WARM_ROUTES:
                wall.append(ms)
                server.append(float(r.json()["latency_ms"]))
            i += 1
            await asyncio.sleep(PROBE_GAP_S)
    return wall, server


async def workload(url: str, clients: int, requests: int, tokens: int
                   ) -> tuple[list[dict[str, Any]], tuple[list[float], list[float]]]:  # fmt: skip
    stop = asyncio.Event()
    probe = asyncio.create_task(route_probe(url, stop))
    try:
        streams = await bench_serve.run_clients(url, "smoa", clients, requests, tokens)
    finally:
        stop.set()
    return streams, await probe


def child(library: Path, freeze: bool, clients: int, requests: int, tokens: int) -> dict[str, Any]:
    """One mode in this interpreter: the server, the workload, the collections' timings."""
    hook = Collections()
    with bench_serve.Server(library, clients, freeze_gc=freeze) as srv:
        walked = len(gc.get_objects())  # what a full collection walks now (frozen objects are in no generation)
        gc.callbacks.append(hook)
        streams, (routes, server) = asyncio.run(workload(srv.url, clients, requests, tokens))
        gc.callbacks.remove(hook)
        t = time.perf_counter()
        gc.collect()
        forced = (time.perf_counter() - t) * 1e3
    itl = [(b - a) * 1e3 for r in streams for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"walked": walked, "counts": [len(hook.ms[g]) for g in range(3)], "gen2_ms": hook.ms[2],
            "routes": routes, "itl": itl, "forced_ms": forced, "server": server}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs every mode once (default 2)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    ap.add_argument("--requests", type=int, default=8, help="completions per client per round (default 8)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per completion (default 32)")
    ap.add_argument("--child", nargs=2, metavar=("LIBRARY", "FREEZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(Path(args.child[0]), args.child[1] == "1", args.clients, args.requests, args.tokens)
        print("RESULT " + json.dumps(out))
        return

    from smoa.models import load_default_base_model

    model, _ = load_default_base_model()
    weights = bench_serve.make_adapters(model, 24, 4)
    del model
    with tempfile.TemporaryDirectory(prefix="smoa-bench-gc-") as tmp:
        rows = run_modes(Path(tmp) / "library", weights, args)
    report(rows, args)


def run_modes(library: Path, weights: list[Any], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every mode once per round, each in its own interpreter; their results by mode."""
    bench_serve.build_library(library, weights)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in MODES}
    for r in range(args.rounds):
        for name in list(MODES)[:: 1 if r % 2 == 0 else -1]:
            cmd = [sys.executable, __file__, "--child", str(library), "1" if MODES[name] else "0",
                   "--clients", str(args.clients), "--requests", str(args.requests), "--tokens", str(args.tokens)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{name} run failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
            rows[name].append(json.loads(lines[-1][7:]))
            print(f"round {r + 1}: {name} done", flush=True)
    return rows


def report(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    print(f"\n{args.rounds} round(s); {args.clients} clients x {args.requests} completions of {args.tokens} tokens "
          f"each, one client routing every {PROBE_GAP_S * 1e3:.0f} ms\n")  # fmt: skip
    print("| mode | objects a full collection walks | collections gen 0 / 1 / 2 | gen-2 slowest / summed ms | "
          "route at the client p50 / p99 / max ms (routes) | route in the server p50 / p99 / max ms | "
          "inter-token p99 / max ms | forced gc.collect() ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        counts = np.sum([run["counts"] for run in runs], axis=0)
        gen2 = [ms for run in runs for ms in run["gen2_ms"]]
        routes = [ms for run in runs for ms in run["routes"]]
        server = [ms for run in runs for ms in run["server"]]
        itl = [ms for run in runs for ms in run["itl"]]
        print(f"| {name} | {int(np.mean([run['walked'] for run in runs])):,} | {' / '.join(map(str, counts))} | "
              f"{max(gen2, default=0):.1f} / {sum(gen2):.1f} | {pct(routes, 50):.1f} / {pct(routes, 99):.1f} / "
              f"{max(routes):.1f} ({len(routes)}) | {pct(server, 50):.2f} / {pct(server, 99):.2f} / {max(server):.1f} | "
              f"{pct(itl, 99):.1f} / {max(itl):.1f} | "
              f"{np.mean([run['forced_ms'] for run in runs]):.1f} |")


if __name__ == "__main__":
    main()
