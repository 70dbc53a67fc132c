"""How long do routes wait for a key refit, or an adaptation's swap, in a big index: one hold of the router's lock,
or a few rows at a time?

``Router.refit_keys()`` (what ``optimize_library()`` runs when the query encoder is not retrained) searches the
index for the rivals of every adapter with examples, fits their keys (in a child interpreter, the default) and
installs the learned keys. The search and the install used to hold the router's lock from start to end; now they
take it :data:`~smoa.routing.router.RIVAL_ROWS` probe rows / :data:`~smoa.routing.router.INSTALL_ADAPTERS`
adapters at a time. Setting both knobs past the work's size gives back the one hold, so both modes run on one
router, side by side, the order alternating per round.

The router: ``--keys`` realistic keys (``bench_routing.Pool``: CLINC150 and BBC sentence embeddings mixed, HNSW on
the defaults), of which the first ``--adapters`` hold 24 examples each (noisy copies of their key) in the learner
and start from their k-means keys. Routes are served back to back on another thread (HYBRID, the embedding
known). Printed per mode: the refit's wall seconds, routes served beside it, their p50 and the slowest, routes
over 10 ms, and the router's lock held longer than 4 ms: how often, and the longest. The process's objects are
frozen out of the garbage collector once built, as ``smoa serve`` does (since 2026-12-07, 15:15 UTC: before, a full
collection inside a hold could add ~100-150 ms to it).

``--swap``: the same for an adaptation's swap (``Router._swap``: encoder, learner and keys flipped at once, in one
hold of the lock). Its keys are in the new space, so they cannot go live a few adapters at a time; they are
inserted into the index hidden beforehand, a few adapters per hold (``Router._stage``), and the swap's hold only
makes them live. Compared with the keys inserted in the swap's hold (nothing staged, as before 2026-12-07). The
swap is given ``--adapters`` learned adapters with 4 keys each (their examples' k-means keys: the count matters, not
the space) and the base encoder as the "new" one, so routes are answered the same way throughout.

``--apply``: the same for one change set of ``--changes`` new adapters from the core (``Router.apply``: a bulk
``create_adapters``, or a replica catching up with another's). It is atomic for the routes, so it goes live in one
hold; a big one is inserted hidden beforehand, a few keys per hold (``Router._stage``), and that hold only makes it
live. Compared with everything inserted in that hold (as before 2026-12-07), and with staging in blocks of a fixed
``--stage-rows`` rows per hold (as before 2026-12-08; now each hold inserts what fits ``--stage-hold-ms`` at the
measured cost per row, at most ``--stage-rows``). Each change set is removed again after its round (not timed).
The ``--adapters`` are refitted first, so the apply also checks which learned adapters the new keys threaten
(``Router._disturbed``, after the hold).

``--remove``: the same for removing just over a quarter of the adapters in one call, which takes the HNSW index past
a quarter of dead positions: compacted in the removal's hold (as before 2026-12-08: the whole graph rebuilt while
every route waits), or on a copy beside the routes (``Router.compact_index``, the default), timed until the
compacted copy is adopted. The removed adapters are added back after each round (not timed).

    .venv/bin/python benchmarks/bench_refit_lock.py                    # 200K keys, 150 adapters, ~4 min
    .venv/bin/python benchmarks/bench_refit_lock.py --swap --adapters 600
    .venv/bin/python benchmarks/bench_refit_lock.py --apply --changes 10000
    .venv/bin/python benchmarks/bench_refit_lock.py --apply --changes 10000 --stage-rows 16   # smaller blocks
    .venv/bin/python benchmarks/bench_refit_lock.py --remove
    .venv/bin/python benchmarks/bench_refit_lock.py --keys 20000 --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_routing  # noqa: E402  (sets one OpenMP thread: faiss searches as in a route)
from bench_adapt_timeline import TracedLock  # noqa: E402

from smoa.config import SMoAConfig  # noqa: E402
from smoa.routing import learner as learner_mod  # noqa: E402
from smoa.routing import router as router_mod  # noqa: E402
from smoa.routing.encoders import l2_normalize  # noqa: E402
from smoa.routing.learner import KeyLearner, initial_keys, owner_of  # noqa: E402
from smoa.routing.router import KeyEntry, Router  # noqa: E402

EXAMPLES = 24
MODES = {"one hold (before)": (10**9, 10**9),
         "blocks (default)": (router_mod.RIVAL_ROWS, router_mod.INSTALL_ADAPTERS)}  # fmt: skip
SWAP_MODES = ("inserted in the swap's hold (before)", "staged (default)")
APPLY_MODES = {  # mode -> (STAGE_MIN_ROWS, STAGE_HOLD_MS)
    "inserted in the apply's hold (before)": (10**9, router_mod.STAGE_HOLD_MS),
    "staged, 32 rows per hold (before)": (router_mod.STAGE_MIN_ROWS, 0.0),
    "staged (default)": (router_mod.STAGE_MIN_ROWS, router_mod.STAGE_HOLD_MS),
}
REMOVE_MODES = {"compacted in the removal's hold (before)": False, "compacted on a copy (default)": True}


def build(n: int, adapters: int, rng: np.random.Generator) -> tuple[Router, list[str]]:
    pool = bench_routing.Pool()
    keys, tags = pool.keys(n, rng)
    texts, qv = pool.queries(500, rng)
    cfg = SMoAConfig(encoder="hash", enable_caching=False, embedding_cache_size=510, routing_threshold=-1.0,
                     max_active_adapters=5)  # fmt: skip
    router = Router(cfg, None, lambda ks: [f"ad_{k:07d}" for k in ks])
    router.encoder.prime(texts, qv)
    router.add(np.arange(n, dtype=np.int64), keys, tags, generation=1)
    lrn = router._learner
    for k in range(adapters):
        ex = l2_normalize(keys[k] + 0.015 * rng.standard_normal((EXAMPLES, keys.shape[1])).astype(np.float32))
        lrn.remember(k, keys[k], ex)
        lrn.initial[k] = ("bench", initial_keys(keys[k], ex, lrn.max_keys))
    return router, texts


def swap(router: Router, staged: bool, rng: np.random.Generator) -> None:
    """One adaptation's swap of ``router``'s learned adapters: a fresh learner holding them, new keys for each."""
    old = router._learner
    fresh = KeyLearner(router.dim, old.max_keys)
    keys = {}
    for k, st in old.stored.items():
        ex = l2_normalize(st.examples.astype(np.float32) + 0.01 * rng.standard_normal(st.examples.shape, np.float32))
        fresh.remember(k, st.text.astype(np.float32), ex)
        fresh.initial[k] = ("bench", initial_keys(st.text.astype(np.float32), ex, old.max_keys))
        keys[k] = fresh.initial[k][1]
    if not staged:
        router._stage = lambda keys: (0, {})  # the path taken when nothing was staged: every key inserted in the hold
    try:
        router._swap(router.encoder, fresh, keys, dict(old.evidence))  # (a refit's evidence: the calibration's)
    finally:
        router.__dict__.pop("_stage", None)
        router._adapted = None  # the "new" encoder is the base one: never released


def change_set(router: Router, n: int, first: int, rng: np.random.Generator) -> list[KeyEntry]:
    """``n`` new adapters with realistic keys, ids from ``first`` on."""
    keys, tags = bench_routing.Pool().keys(n, rng)
    return [KeyEntry(first + j, keys[j], d, s) for j, (d, s) in enumerate(tags)]


_REMOVED: list[tuple[np.ndarray, list[np.ndarray], list[tuple[list[str], list[str]]]]] = []


def remove_quarter(router: Router, background: bool, rng: np.random.Generator) -> None:
    """Remove just over a quarter of the adapters in one call and wait until the index is compacted."""
    router_mod.COMPACT_IN_BACKGROUND = background
    adapters = np.unique(owner_of(router._vectors.live_ids()))  # (one key each here)
    keys = np.sort(rng.choice(adapters, len(adapters) // 4 + len(adapters) // 100, replace=False)).astype(np.int64)
    tags = [router._tags.tags_of(int(k)) or ((), ()) for k in keys]
    _REMOVED.append((keys, [router.key_vectors(int(k)) for k in keys], [(list(d), list(s)) for d, s in tags]))
    dead = router._vectors.dead
    router.remove(keys.tolist(), router.generation + 1)
    if router._compactor.thread is not None:
        router._compactor.thread.join()
    assert router._vectors.dead <= dead, "not compacted"


def add_back(router: Router) -> None:
    """The adapters the last :func:`remove_quarter` removed, added back in one call (not timed)."""
    keys, mats, tags = _REMOVED.pop()
    router.add(keys, mats, tags, router.generation + 1)


def one(router: Router, texts: list[str], lock: TracedLock, work=None) -> dict[str, float]:
    lat: list[float] = []
    stop = threading.Event()

    def serve() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            router.route(texts[i % len(texts)], strategy="hybrid", k=5)
            lat.append((time.perf_counter() - t) * 1e3)
            i += 1

    th = threading.Thread(target=serve, name="routes")
    th.start()
    time.sleep(0.2)
    lock.holds.clear()
    n0 = len(lat)
    t = time.perf_counter()
    if work is None:
        router.refit_keys(in_child=learner_mod.FIT_IN_CHILD)
    else:
        work()
    wall = time.perf_counter() - t
    n1 = len(lat)
    stop.set()
    th.join()
    ms = np.array(lat[n0 : n1 + 1])
    held = [h for _, h in lock.holds]
    return {"wall": wall, "routes": len(ms), "p50": float(np.median(ms)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "over10": int((ms > 10).sum()), "holds": len(held),
            "longest": max(held, default=0.0)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--adapters", type=int, default=150, help="adapters with examples (refitted)")
    ap.add_argument("--rounds", type=int, default=2, help="refits (swaps) per mode")
    ap.add_argument("--swap", action="store_true", help="an adaptation's swap instead of a refit")
    ap.add_argument("--apply", action="store_true", help="one change set of new adapters instead of a refit")
    ap.add_argument("--changes", type=int, default=10_000, help="adapters in the --apply change set")
    ap.add_argument("--remove", action="store_true", help="remove over a quarter of the adapters instead of a refit")
    ap.add_argument("--stage-rows", type=int, default=router_mod.STAGE_ROWS,
                    help="keys staged per hold of the lock (--swap, --apply; the default's block size)")
    ap.add_argument("--stage-hold-ms", type=float, default=router_mod.STAGE_HOLD_MS,
                    help="the default's hold budget for staging (--swap, --apply; 0: --stage-rows per hold)")
    ap.add_argument("--no-freeze-gc", action="store_true", help="leave the collector as it is (before 15:15 UTC)")
    args = ap.parse_args()
    router_mod.STAGE_ROWS, router_mod.STAGE_HOLD_MS = args.stage_rows, args.stage_hold_ms
    APPLY_MODES["staged (default)"] = (router_mod.STAGE_MIN_ROWS, args.stage_hold_ms)
    t = time.perf_counter()
    router, texts = build(args.keys, args.adapters, np.random.default_rng(0))
    print(f"{args.keys:,} keys ({router._vectors.kind}, efSearch {router._vectors.ef_search}), {args.adapters} "
          f"adapters with examples; built in {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    if args.swap or args.apply:  # learned adapters: the swap's calibration evidence; the apply's _disturbed
        router.refit_keys(in_child=learner_mod.FIT_IN_CHILD)
    for i in range(50):  # warm up
        router.route(texts[i], strategy="hybrid", k=5)
    if not args.no_freeze_gc:
        gc.collect()
        gc.freeze()  # as `smoa serve` does after loading (ServeConfig.freeze_gc): no full collection in a hold
    lock = router._lock = TracedLock(router._lock)
    names = (SWAP_MODES if args.swap else tuple(APPLY_MODES) if args.apply else tuple(REMOVE_MODES) if args.remove
             else tuple(MODES))  # fmt: skip
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    rng = np.random.default_rng(1)
    for r in range(args.rounds):
        for name in names[:: 1 if r % 2 == 0 else -1]:
            if args.swap:
                rows[name].append(one(router, texts, lock, lambda: swap(router, name == SWAP_MODES[1], rng)))
            elif args.remove:
                rows[name].append(one(router, texts, lock, lambda: remove_quarter(router, REMOVE_MODES[name], rng)))
                add_back(router)
            elif args.apply:
                entries = change_set(router, args.changes, args.keys + 10 * args.changes, rng)
                router_mod.STAGE_MIN_ROWS, router_mod.STAGE_HOLD_MS = APPLY_MODES[name]
                rows[name].append(one(router, texts, lock, lambda: router.apply(entries, [], router.generation + 1)))
                router.apply([], [e.key for e in entries], router.generation + 1)
                # a compaction the removal started ends before the next round
                if router._compactor.thread is not None:
                    router._compactor.thread.join()
            else:
                router_mod.RIVAL_ROWS, router_mod.INSTALL_ADAPTERS = MODES[name]
                rows[name].append(one(router, texts, lock))
            print(f"round {r + 1}: {name} done", flush=True)
    router_mod.RIVAL_ROWS, router_mod.INSTALL_ADAPTERS = MODES["blocks (default)"]
    router_mod.STAGE_MIN_ROWS, router_mod.STAGE_HOLD_MS = APPLY_MODES["staged (default)"]
    router_mod.COMPACT_IN_BACKGROUND = True
    what = "swap" if args.swap else "apply" if args.apply else "removal" if args.remove else "refit"
    print(f"\n| mode | {what} s | routes beside it | route p50 ms | route p99 ms | slowest route ms | routes > 10 ms | "
          "lock holds > 4 ms: count, longest ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        for x in runs:
            print(f"| {name} | {x['wall']:.1f} | {x['routes']} | {x['p50']:.2f} | {x['p99']:.2f} | {x['max']:.1f} | "
                  f"{x['over10']} | {x['holds']}, {x['longest']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
