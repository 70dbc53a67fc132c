"""During an adaptation, which of its phases do the slow routes served beside it fall in, and who holds the router's lock?

``Router.adapt`` (the query LoRA's training, the examples' re-encoding, the key fit, the swap, the projection's and
the tag weight's tuning) beside routes served back to back, as in ``bench_adapt_load.py --whole`` (CLINC150's first
``--intents`` intents x ``--per-intent`` examples, training cut to ``--steps`` steps). Each phase and each route is
timestamped, and every hold of the router's lock over 4 ms is traced to the function that took it. Printed per
adaptation (``--rounds``), for the refit's work in child interpreters (``learner.FIT_IN_CHILD``, the default) and,
with ``--here``, in this process:

* one table: each phase's start, end and wall ms, how many routes over ``--slow`` ms overlap it and the slowest;
* one table: the lock's long holds, grouped by holder (count, total and longest ms).

Run: ``python benchmarks/bench_adapt_timeline.py`` (~1 min per adaptation on 2 cores). A route overlapping several
phases counts in each; the tables say where the slow routes happen, not what each millisecond was spent on.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
import traceback
from collections import defaultdict

import numpy as np

from bench_adapt_load import library
from smoa.routing import adapt as qa
from smoa.routing import learner as learner_mod
from smoa.routing import router as router_mod

PHASES = [(qa, "adapt_encoder"), (qa.AdaptedEncoder, "__init__"), (router_mod.Router, "_reencoded"),
          (router_mod.Router, "_fit_fresh"), (router_mod.Router, "_swap"),
          (learner_mod.KeyLearner, "tune_projection"), (router_mod.Router, "_tune_tag_weight")]  # fmt: skip
LOCK_MS = 4.0


class TracedLock:
    """The router's RLock, recording each outermost hold over :data:`LOCK_MS` with the function that took it."""

    def __init__(self, inner) -> None:
        self.inner, self.depth, self.holds = inner, 0, []

    def acquire(self, *a, **kw) -> bool:
        ok = self.inner.acquire(*a, **kw)
        if ok:
            self.depth += 1
            if self.depth == 1:
                self.t, self.by = time.perf_counter(), traceback.extract_stack(limit=3)[0].name
        return ok

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and (ms := (time.perf_counter() - self.t) * 1e3) > LOCK_MS:
            self.holds.append((self.by, ms))
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def traced(phases: list) -> None:
    for owner, name in PHASES:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*a, _real=real, _label=f"{getattr(owner, '__name__', owner)}.{name}", **kw):
            t = time.perf_counter()
            try:
                return _real(*a, **kw)
            finally:
                phases.append((_label, t, time.perf_counter()))

        setattr(owner, name, wrapper)


def one(router, queries: list[str], phases: list, lock: TracedLock, slow: float, label: str) -> None:
    served: list[tuple[float, float]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            router.route(queries[len(served) % len(queries)])
            served.append((t, time.perf_counter()))

    phases.clear()
    lock.holds.clear()
    th = threading.Thread(target=serve, name="routes")
    th.start()
    t0 = time.perf_counter()
    router.adapt(epochs=1e-9)
    stop.set()
    th.join()
    ms = np.array([(e - s) * 1e3 for s, e in served])
    print(f"\n{label}: {len(ms)} routes, p50 / p99 / max {np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f} / "
          f"{ms.max():.1f} ms, {int((ms > slow).sum())} over {slow:g} ms\n")  # fmt: skip
    print(f"| phase | start s | end s | wall ms | routes over {slow:g} ms in it | slowest ms |")
    print("|---|---|---|---|---|---|")
    for name, ps, pe in sorted(phases, key=lambda p: p[1]):
        hit = [(e - s) * 1e3 for s, e in served if s < pe and e > ps and (e - s) * 1e3 > slow]
        print(f"| {name} | {ps - t0:.2f} | {pe - t0:.2f} | {(pe - ps) * 1e3:.0f} | {len(hit)} | "
              f"{max(hit, default=0):.1f} |")  # fmt: skip
    by: dict[str, list[float]] = defaultdict(list)
    for who, held in lock.holds:
        by[who].append(held)
    print(f"\n| router's lock held > {LOCK_MS:g} ms by | holds | total ms | longest ms |")
    print("|---|---|---|---|")
    for who, xs in sorted(by.items(), key=lambda kv: -max(kv[1])):
        print(f"| {who} | {len(xs)} | {sum(xs):.0f} | {max(xs):.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intents", type=int, default=20)
    ap.add_argument("--per-intent", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10, help="training steps of each adaptation")
    ap.add_argument("--rounds", type=int, default=2, help="adaptations per mode")
    ap.add_argument("--slow", type=float, default=5.0, help="a route over this many ms counts as slow")
    ap.add_argument("--here", action="store_true", help="also the refit's work in this process (before)")
    args = ap.parse_args(argv)
    router, _, _, queries = library(args.intents, args.per_intent)
    router.wait_fast_path(300)
    for q in queries[:50]:  # warm up
        router.route(q)
    qa.MIN_STEPS = args.steps  # a training knob: it reaches the child with the request
    router.adapt(epochs=1e-9)  # not timed: each adaptation then swaps one learned encoder for another
    phases: list = []
    traced(phases)
    lock = router._lock = TracedLock(router._lock)
    for in_child in (True, False) if args.here else (True,):
        learner_mod.FIT_IN_CHILD = in_child
        where = "child interpreters (default)" if in_child else "this process (before)"
        for r in range(args.rounds):
            one(router, queries, phases, lock, args.slow, f"refit's fit and tuning in {where}, adaptation {r + 1}")
    learner_mod.FIT_IN_CHILD = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
