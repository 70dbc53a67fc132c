"""Where does a route's time go under a tight latency budget, and what does the rescue's cache save?

At ``routing_latency_budget_ms=1.0`` a route takes the cascade's fast path: the static encoder, the projection into
the key space, an HNSW walk narrowed to the budget, the small groups' rescue, the fusion and the selection. Its
parts run cold: the walk reads a few hundred KB at random and evicts what the Python and the tokenizer had in the
CPU caches, so each part costs several times what it costs in a loop of its own. This script builds the
benchmark router of ``bench_routing.py --budgets`` (CLINC150's 150 intent adapters with their examples, plus
"realistic" distractors up to ``--adapters``), routes CLINC150 val queries at the budget and times each part
inside the routes, for two modes side by side (interleaved rounds; each mode routes queries it never saw, while
the caches keep what earlier routes of either mode left, as in a router serving a stream of queries):

* ``now``                  the code as it is;
* ``rescue set uncached``  the rescue concatenates its groups' rows on every route (as when its cache was keyed by
                           the order of the groups' cosines, which changes from query to query: before 2026-12-07).

    python benchmarks/bench_budget_path.py                      # 1,000,000 adapters (~7 min to build)
    python benchmarks/bench_budget_path.py --adapters 1000      # quick

Prints one table: mode, route p50 / p99 ms (end to end), then p50 / p99 us of each part, timed in the routes.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_routing  # noqa: E402  (the budget table's router)
import eval_clinc  # noqa: E402

MODES = ("now", "rescue set uncached")


def timed_parts(router) -> dict[str, list[int]]:  # router: smoa.routing.router.Router
    """Wrap the fast path's parts on this router (instance attributes) with ns timers; returns their samples,
    appended per call (a part called twice in one route is summed by the caller)."""
    import smoa.routing.router as router_mod

    samples: dict[str, list[int]] = {}

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                samples.setdefault(label, []).append(time.perf_counter_ns() - t)

        setattr(obj, name, timed)

    wrap(router._fast, "_tokens", "tokenize")  # the tokenizer (it releases the GIL: a refit beside runs then)
    wrap(router._fast, "encode", "static encode (incl. tokenize)")
    wrap(router._learner, "project", "projection")
    wrap(router._vectors, "search", "index search (walk + re-score)")
    wrap(router, "_small_group_scores", "small-group rescue")
    wrap(router, "_separable", "same-key check")
    wrap(router, "_tag_after_walk", "tag side")
    wrap(router_mod, "select_top", "selection")
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=1_000_000)
    ap.add_argument("--budget", type=float, default=1.0, help="routing_latency_budget_ms")
    ap.add_argument("--queries", type=int, default=500, help="CLINC150 val queries per mode and round (distinct)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds x modes x queries <= 3,000 (the val split)")
    args = ap.parse_args(argv)

    from smoa.data.clinc import clinc150

    rng = np.random.default_rng(0)
    eval_clinc.memo_adaptation()
    t = time.perf_counter()
    router, _ = bench_routing.budget_router(args.adapters, rng, "realistic")
    print(f"built {args.adapters:,} adapters in {time.perf_counter() - t:.0f} s", flush=True)
    router.config.routing_latency_budget_ms = args.budget
    texts = [e.text for e in clinc150("val")]
    rng.shuffle(texts)
    if args.rounds * len(MODES) * args.queries > len(texts):
        ap.error(f"--rounds x {len(MODES)} x --queries must be <= {len(texts)}")
    samples = timed_parts(router)
    plain_group_vectors = router._group_vectors

    def uncached_group_vectors(names):  # each group's rows stay cached; their concatenation is made again
        if len(names) > 1 and names in router._rescue:
            router._rescue_rows -= len(router._rescue.pop(names)[0])
        return plain_group_vectors(names)

    for e in clinc150("oos_val"):  # warm-up (cost models, side choice) on queries no mode routes
        router.route(e.text)
    lat = {m: [] for m in MODES}
    parts: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    for r in range(args.rounds):
        for i, mode in enumerate(MODES):
            router._group_vectors = uncached_group_vectors if mode == "rescue set uncached" else plain_group_vectors
            router.encoder._cache.clear()  # every query encoded for real
            router.query_encoder._cache.clear()
            for text in texts[(r * len(MODES) + i) * args.queries :][: args.queries]:
                for v in samples.values():
                    v.clear()
                t = time.perf_counter_ns()
                router.route(text)
                lat[mode].append((time.perf_counter_ns() - t) / 1e6)
                for label, v in samples.items():
                    if v:
                        parts[mode].setdefault(label, []).append(sum(v) / 1e3)
    router._group_vectors = plain_group_vectors
    labels = sorted({label for m in MODES for label in parts[m]}, key=lambda s: -np.median(parts["now"].get(s, [0])))
    n = len(lat["now"])
    print(f"\n{args.adapters:,} adapters, budget {args.budget:g} ms, {n} routes per mode ({args.rounds} interleaved "
          f"rounds); parts: p50 / p99 us over the routes that ran them (share of routes)\n")
    print("| mode | route p50 ms | route p99 ms | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for mode in MODES:
        cells = []
        for label in labels:
            xs = parts[mode].get(label, [])
            cells.append(f"{np.percentile(xs, 50):.0f} / {np.percentile(xs, 99):.0f} ({100 * len(xs) / n:.0f} %)"
                         if xs else "-")  # fmt: skip
        print(f"| {mode} | {np.percentile(lat[mode], 50):.3f} | {np.percentile(lat[mode], 99):.3f} | "
              + " | ".join(cells) + " |")
    router.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
