"""Does training the query LoRA in the background slow the routes served meanwhile, or get starved by them?

The router learns a query encoder (:mod:`smoa.routing.adapt`) off its lock while routes go on. Inside the serving
process the two would share the GIL: torch hands it back at every operator, and a thread that wants it back waits
up to Python's switch interval (5 ms) while another runs Python. Side by side in one run, the same training
(``train_query_lora``: CLINC150 train texts of ``--intents`` intents, ``--per-intent`` each, the defaults' epochs
and step floor) in this process's thread (``in_subprocess=False``, the design before) and in a child interpreter
(``in_subprocess=True``, the default, at nice ``CHILD_NICE``), each once alone and once while a thread serves routes
back to back (CLINC150 val texts through a router over the same intents, the default encoder, route cache off); and
the child at nice 0 beside the routes.

Columns: training seconds (wall), routes served during it, route latency p50 / p99 / max (wall, ms) and how many
routes took over 10 ms; first, the same routes with no training beside them.

Run: ``python benchmarks/bench_adapt_load.py`` (~6 min on 2 cores).

``--whole``: the whole adaptation instead (``Router.adapt``: train, encode the library's examples with the new
encoder, refit the keys, swap), beside routes back to back, side by side: examples encoded and the encoder's
graphs built in the training child, the keys fitted and the fast projection tuned in children of their own (the
default); those two in this process (before); the graphs built there too (before); the examples encoded there too
(before). A column gives the adapting thread's CPU seconds (what the serving process spends), one the key fit's
wall seconds. The training itself is cut to ``--whole-steps`` steps (the part after it is what differs). ``python benchmarks/bench_adapt_load.py --whole --intents 150
--per-intent 100`` (all of CLINC150 train, 15,000 texts; ~5 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import numpy as np

from smoa.config import SMoAConfig
from smoa.data.clinc import clinc150
from smoa.routing import adapt as qa
from smoa.routing import learner as learner_mod
from smoa.routing.learner import KeyLearner
from smoa.routing.router import KeyEntry, Router, RoutingText


def library(intents: int, per_intent: int) -> tuple[Router, list[str], list[int], list[str]]:
    train, val = clinc150("train"), clinc150("val")
    names = sorted({e.intent for e in train})[:intents]
    by = {i: [e.text for e in train if e.intent == i][:per_intent] for i in names}
    domain = {e.intent: e.domain for e in train}
    router = Router(SMoAConfig(enable_caching=False), None, lambda ks: [names[k - 1] for k in ks])
    for j, intent in enumerate(names):
        it = RoutingText([domain[intent]], [intent], "", by[intent])
        router.apply([KeyEntry(j + 1, router.encode_keys([it])[0], it.domain_tags, it.skill_tags)], [], j + 1)
    texts = [t for i in names for t in by[i]]
    labels = [j for j, i in enumerate(names) for _ in by[i]]
    return router, texts, labels, [e.text for e in val if e.intent in by]


def serve(router: Router, queries: list[str], stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        router.route(queries[len(out) % len(queries)])
        out.append((time.perf_counter() - t) * 1e3)


def pct(xs: list[float]) -> str:
    return f"{np.percentile(xs, 50):.2f} / {np.percentile(xs, 99):.2f} / {max(xs):.1f}" if xs else "-"


def over(xs: list[float], ms: float = 10.0) -> str:
    return str(sum(x > ms for x in xs)) if xs else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intents", type=int, default=20)
    ap.add_argument("--per-intent", type=int, default=50)
    ap.add_argument("--whole", action="store_true",
                    help="Router.adapt beside routes: examples encoded in the child vs here")
    ap.add_argument("--whole-steps", type=int, default=10, help="training steps of each --whole adaptation")
    args = ap.parse_args(argv)
    router, texts, labels, queries = library(args.intents, args.per_intent)
    router.wait_fast_path(300)
    for q in queries[:50]:  # warm up
        router.route(q)
    idle: list[float] = []
    stop = threading.Event()
    timer = threading.Timer(10.0, stop.set)
    timer.start()
    serve(router, queries, stop, idle)
    print(f"{len(texts)} example texts of {args.intents} adapters; routes alone for 10 s: {len(idle)} served, "
          f"p50 / p99 / max {pct(idle)} ms, {over(idle)} over 10 ms\n")  # fmt: skip
    if args.whole:
        return whole(router, queries, args.whole_steps)
    print("| training | beside it | training s | routes served | route p50 / p99 / max ms | routes > 10 ms |")
    print("|---|---|---|---|---|---|")
    default = qa.CHILD_NICE
    runs = [("this process's thread", False, default, False), ("this process's thread", False, default, True),
            (f"child process at nice {default} (default)", True, default, False),
            (f"child process at nice {default} (default)", True, default, True),
            ("child process at nice 0", True, 0, True)]  # fmt: skip
    for where, child, nice, load in runs:
        qa.CHILD_NICE = nice  # the training child is started at this nice
        served: list[float] = []
        stop = threading.Event()
        th = threading.Thread(target=serve, args=(router, queries, stop, served)) if load else None
        if th is not None:
            th.start()
        t = time.perf_counter()
        qa.train_query_lora(texts, labels, in_subprocess=child)
        secs = time.perf_counter() - t
        stop.set()
        if th is not None:
            th.join()
        print(f"| {where} | {'routes back to back' if load else 'nothing'} | {secs:.1f} | "
              f"{len(served) if load else '-'} | {pct(served)} | {over(served)} |", flush=True)  # fmt: skip
    qa.CHILD_NICE = default
    return 0


def whole(router: Router, queries: list[str], steps: int) -> int:
    """``--whole`` (module docstring): one ``Router.adapt`` per row, routes served back to back beside it."""
    real_adapt, real_fit = qa.adapt_encoder, KeyLearner.fit
    fit_s: list[float] = []

    def here(texts, labels, encode=(), *a, **kw):  # the design before: the child trains, this process encodes
        return real_adapt(texts, labels, (), *a, **kw)

    def graphs_here(*a, **kw):  # the design before: this process builds the encoder's graphs
        return dataclasses.replace(real_adapt(*a, **kw), graphs=None)

    def timed_fit(self, *a, **kw):  # the key fit's wall time (in the child or here)
        t = time.perf_counter()
        try:
            return real_fit(self, *a, **kw)
        finally:
            fit_s.append(time.perf_counter() - t)

    KeyLearner.fit = timed_fit
    qa.MIN_STEPS, epochs = steps, 1e-9  # a training knob: it reaches the child with the request
    router.adapt(epochs=epochs)  # not timed: each row then swaps one learned encoder for another (a cold cache each)
    print("| examples encoded, graphs built, keys fitted, projection tuned in | adapt s (train s, key fit s) "
          "| adapting thread CPU s | routes served | route p50 / p99 / max ms | routes > 10 ms |")
    print("|---|---|---|---|---|---|")
    rows = (("the training child; keys, projection: a child (default)", real_adapt, True),
            ("the training child; keys, projection: this process (before)", real_adapt, False),
            ("examples: the child; graphs, keys, projection: this process (before)", graphs_here, False),
            ("examples, graphs, keys, projection: this process (before)", here, False))  # fmt: skip
    for where, fn, keys_in_child in rows:
        qa.adapt_encoder, learner_mod.FIT_IN_CHILD = fn, keys_in_child
        served: list[float] = []
        fit_s.clear()
        stop = threading.Event()
        th = threading.Thread(target=serve, args=(router, queries, stop, served))
        th.start()
        t, cpu = time.perf_counter(), time.thread_time()
        report = router.adapt(epochs=epochs)
        secs, cpu = time.perf_counter() - t, time.thread_time() - cpu
        stop.set()
        th.join()
        train = report["adapt_seconds"] if report else float("nan")
        print(f"| {where} | {secs:.1f} ({train:.1f}, {sum(fit_s):.1f}) | {cpu:.1f} | {len(served)} | {pct(served)} | "
              f"{over(served)} |", flush=True)  # fmt: skip
    qa.adapt_encoder, learner_mod.FIT_IN_CHILD, KeyLearner.fit = real_adapt, True, real_fit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
