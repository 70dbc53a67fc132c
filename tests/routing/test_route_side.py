"""The route's side thread (smoa.routing.side): HYBRID's walk-free steps beside the HNSW walk give the serial
path's routes float for float, errors reach the caller, and the thread follows the router's life."""

from __future__ import annotations

import gc
import math
import os
import threading
import time

import numpy as np
import pytest

from smoa.config import SMoAConfig
from smoa.errors import ConfigError
from smoa.routing import router as router_mod
from smoa.routing.costs import (
    SIDE_CLEAR_SAMPLES,
    SIDE_EXPLORE_EVERY,
    SIDE_EXPLORE_WARM,
    SIDE_MIN_SAMPLES,
    SIDE_SAMPLES,
    SideChoice,
)
from smoa.routing.index import IndexParams
from smoa.routing.router import Router, RoutingText
from smoa.routing.side import SideThread

WORDS = ("billing refund invoice payment card travel flight hotel booking visa weather forecast rain music song "
         "playlist recipe cooking bake bread insurance claim doctor symptom fever loan mortgage bank transfer "
         "alarm timer calendar meeting email translate language spanish french car repair tire oil").split()


def ids_of(keys: list[int]) -> list[str]:
    return [f"ad_{k:05d}" for k in keys]


def _items(n: int, rng: np.random.Generator) -> list[RoutingText]:
    out = []
    for i in range(n):
        a, b, c = rng.choice(WORDS, 3, replace=False)
        out.append(RoutingText([str(a)], [f"{b}-{i % 7}"], f"{a} {b} {c} helper number {i}"))
    return out


@pytest.fixture(scope="module")
def hnsw_router():
    rng = np.random.default_rng(7)
    items = _items(3000, rng)
    # no budget: a stall of the box (the suite runs on 2 shared cores) must not narrow one route's beam and not the other's
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False, routing_parallel_side=True,
                        routing_latency_budget_ms=math.inf)
    router = Router(config, None, ids_of, params=IndexParams(exact_threshold=100, ef_search=64))
    keys = router.routing_keys(items)
    router.add(np.arange(len(items)), keys, [(it.domain_tags, it.skill_tags) for it in items], generation=1)
    assert router._vectors.kind != "flat" and router._side is not None
    queries = [" ".join(rng.choice(WORDS, int(rng.integers(2, 6)))) for _ in range(120)]
    queries += ["nothing here matches at all", "zzz qqq"]
    return router, queries


def test_side_thread_routes_equal_the_serial_path(hnsw_router, monkeypatch) -> None:
    router, queries = hnsw_router
    side = router._side
    started = []
    real_start = side.start

    def counted(fn):
        started.append(1)
        return real_start(fn)

    monkeypatch.setattr(side, "start", counted)
    monkeypatch.setattr(router.config, "routing_parallel_side", False)
    for meta in (None, {"domain": "travel"}):
        for q in queries:
            router.config.routing_parallel_side = False
            serial = router.route(q, meta, strategy="hybrid", k=5)
            router.config.routing_parallel_side = True
            beside = router.route(q, meta, strategy="hybrid", k=5)
            assert beside.adapter_ids == serial.adapter_ids, q
            assert beside.routing_scores == serial.routing_scores, q  # float for float
            assert beside.degraded == serial.degraded
    assert len(started) == 2 * len(queries)  # every HYBRID route over the HNSW index took the side thread
    started.clear()
    router.route(queries[0], strategy="semantic", k=5)  # SEMANTIC: the rescue alone is cheaper than a hand-over
    assert started == []


def test_auto_times_both_modes_and_keeps_the_faster() -> None:
    """``routing_parallel_side="auto"``: each mode runs until it has SIDE_MIN_SAMPLES timings, then the one with the
    lower median, and the other once per SIDE_EXPLORE_WARM routes until its window is full or the lead is clear
    (here at once: 0.3 against 0.5 ms, so once the slower mode has SIDE_CLEAR_SAMPLES timings), then once per
    SIDE_EXPLORE_EVERY routes."""
    choice = SideChoice()

    def serve(n: int) -> list[bool]:
        runs = []
        for _ in range(n):
            runs.append(choice.pick())
            choice.record(runs[-1], 0.3 if runs[-1] else 0.5)  # beside faster
        return runs

    serve(2 * SIDE_MIN_SAMPLES)
    assert len(choice.ms[True]) == len(choice.ms[False]) == SIDE_MIN_SAMPLES  # alternated until both had enough
    warm = serve((SIDE_CLEAR_SAMPLES - SIDE_MIN_SAMPLES) * SIDE_EXPLORE_WARM)
    assert warm.count(False) == SIDE_CLEAR_SAMPLES - SIDE_MIN_SAMPLES and len(choice.ms[False]) == SIDE_CLEAR_SAMPLES
    assert all(warm[i] for i in range(len(warm)) if (i + 1 + 2 * SIDE_MIN_SAMPLES) % SIDE_EXPLORE_WARM)
    runs = serve(4 * SIDE_EXPLORE_EVERY)
    start = 2 * SIDE_MIN_SAMPLES + len(warm) + 1  # the route count of runs[0]
    assert runs.count(False) == 4 and all(runs[i] for i in range(len(runs)) if (i + start) % SIDE_EXPLORE_EVERY)
    for _ in range(SIDE_SAMPLES):  # the machine changed: beside is now the slower
        choice.record(True, 0.9)
    assert sum(choice.pick() for _ in range(SIDE_EXPLORE_EVERY)) == 1


@pytest.mark.parametrize("cold_runs", [SIDE_MIN_SAMPLES, SIDE_CLEAR_SAMPLES // 2 + 2])
def test_auto_soon_leaves_a_mode_its_first_noisy_timings_chose(cold_runs: int) -> None:
    """The first SIDE_MIN_SAMPLES timings of each mode are few and noisy: when they make the slower mode look faster,
    the other mode is timed often enough (SIDE_EXPLORE_WARM) that the choice turns within a few hundred routes, not
    after thousands (once per SIDE_EXPLORE_EVERY, as before). 10 cold timings of 16 still hold the side's median
    up when a clear lead could end the warm phase: its latest timings, not cold, keep it going."""
    rng = np.random.default_rng(0)
    choice = SideChoice()
    picks = []
    for _ in range(2000):
        beside = choice.pick()
        picks.append(beside)
        cold = beside and picks.count(True) <= cold_runs  # its first timings: unlucky
        choice.record(beside, float(rng.normal(1.2 if cold else 0.6, 0.1) if beside else rng.normal(0.8, 0.1)))
    assert not picks[2 * SIDE_MIN_SAMPLES]  # the first timings chose serial
    assert np.mean(picks[600:]) > 0.99  # and then the faster mode, beside the walk


def test_auto_ends_its_warm_phase_early_only_on_a_clear_lead() -> None:
    """The other mode is timed once per SIDE_EXPLORE_WARM routes until its window is full, unless the chosen mode
    leads clearly (medians 20 % apart: a fresh 1M-key router's case); a lead within the timings' noise keeps the
    whole warm phase (each mode is then nearly as good, and the choice may still turn)."""
    rng = np.random.default_rng(1)

    def serial_share(after_ms: float, routes: int = 600) -> tuple[float, int]:
        choice = SideChoice()
        picks = []
        for _ in range(routes):
            beside = choice.pick()
            picks.append(beside)
            choice.record(beside, float(rng.normal(0.6 if beside else after_ms, 0.05)))
        return 1 - float(np.mean(picks)), len(choice.ms[False])

    share, timed = serial_share(0.72)  # beside leads by 20 %
    assert share < 0.05 and timed < SIDE_CLEAR_SAMPLES + 3
    share, timed = serial_share(0.61)  # within the noise
    assert timed >= SIDE_SAMPLES - 2 and share > 0.1


def test_auto_on_a_live_router_uses_both_modes_and_gives_the_same_routes(hnsw_router) -> None:
    router, queries = hnsw_router
    router.config.routing_parallel_side = False
    serial = [router.route(q, strategy="hybrid", k=5) for q in queries[:40]]
    router.config.routing_parallel_side = "auto"
    router._side_choice = SideChoice()
    try:
        auto = [router.route(q, strategy="hybrid", k=5) for q in queries[:40]]
    finally:
        router.config.routing_parallel_side = True
    assert [r.adapter_ids for r in auto] == [r.adapter_ids for r in serial]
    assert [r.routing_scores for r in auto] == [r.routing_scores for r in serial]
    assert min(len(router._side_choice.ms[True]), len(router._side_choice.ms[False])) >= SIDE_MIN_SAMPLES


def test_an_error_on_the_side_reaches_the_caller_and_the_router_goes_on(hnsw_router, monkeypatch) -> None:
    router, queries = hnsw_router
    before = router.route(queries[1], strategy="hybrid", k=5)

    def broken(*args, **kwargs):
        raise RuntimeError("side failed")

    monkeypatch.setattr(router, "_rare_candidates", broken)
    with pytest.raises(RuntimeError, match="side failed"):
        router.route(queries[1], strategy="hybrid", k=5)
    monkeypatch.undo()
    after = router.route(queries[1], strategy="hybrid", k=5)
    assert after.adapter_ids == before.adapter_ids and after.routing_scores == before.routing_scores


def test_a_failed_walk_waits_for_the_side_before_the_route_returns(hnsw_router, monkeypatch) -> None:
    """The side reads the index: a route that fails in its walk must not release the router's lock (and let a
    writer change the index) while the side still runs."""
    router, queries = hnsw_router
    ended = threading.Event()
    real_rescue = router._small_group_scores

    def slow_rescue(q, limit):
        time.sleep(0.05)
        out = real_rescue(q, limit)
        ended.set()
        return out

    def broken_search(*args, **kwargs):
        raise MemoryError("walk failed")

    monkeypatch.setattr(router, "_small_group_scores", slow_rescue)
    monkeypatch.setattr(router._vectors, "search", broken_search)
    with pytest.raises(MemoryError, match="walk failed"):
        router.route(queries[2], strategy="hybrid", k=5)
    assert ended.is_set()


def test_side_thread_results_errors_restart_and_fork() -> None:
    side = SideThread(name="smoa-test-side")
    assert side.start(lambda: 41 + 1).result() == 42
    p = side.start(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        p.result()
    side.close()
    assert side.start(lambda: "again").result() == "again"  # a closed side thread starts anew
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:  # the child has no helper thread: start must make one, not wait forever
            code = 0 if side.start(lambda: os.getpid()).result() == os.getpid() else 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    side.close()


def _side_threads() -> int:
    return sum(t.name == "smoa-route-side" for t in threading.enumerate())


def test_the_side_thread_ends_with_its_router() -> None:
    gc.collect()
    before = _side_threads()
    rng = np.random.default_rng(3)
    items = _items(400, rng)
    router = Router(SMoAConfig(encoder="hash", enable_caching=False), None, ids_of,
                    params=IndexParams(exact_threshold=100, ef_search=32))
    router.add(np.arange(len(items)), router.routing_keys(items), [(it.domain_tags, it.skill_tags) for it in items], 1)
    router.route("travel flight booking", strategy="hybrid")
    assert _side_threads() == before + 1
    del router
    gc.collect()
    deadline = time.monotonic() + 5
    while _side_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _side_threads() == before


def test_side_thread_off_by_config_or_on_one_cpu(hnsw_router, monkeypatch) -> None:
    router, queries = hnsw_router
    side = router._side
    started = []
    real_start = side.start
    monkeypatch.setattr(side, "start", lambda fn: started.append(1) or real_start(fn))
    router.config.routing_parallel_side = False  # switched on a live router
    try:
        router.route(queries[3], strategy="hybrid")
    finally:
        router.config.routing_parallel_side = True
    assert started == []
    router.route(queries[3], strategy="hybrid")
    assert started == [1]
    monkeypatch.setattr(router_mod, "usable_cpus", lambda: 1)
    assert Router(SMoAConfig(encoder="hash"), None, ids_of)._side is None
    for bad in ("yes", 1, None, "AUTO "):
        with pytest.raises(ConfigError, match="routing_parallel_side"):
            SMoAConfig(routing_parallel_side=bad)  # type: ignore[arg-type]
    assert SMoAConfig().routing_parallel_side == "auto"


def test_a_beam_narrowed_by_the_budget_walks_without_the_side(hnsw_router, monkeypatch) -> None:
    """Beside a short walk the hand-over costs more than it hides (1M keys, 1 ms budget: p50 0.85 against 0.62 ms):
    a route whose beam the budget narrowed runs the tag side after the walk, even with the side thread forced on."""
    router, queries = hnsw_router
    side = router._side
    started = []
    real_start = side.start
    monkeypatch.setattr(side, "start", lambda fn: started.append(1) or real_start(fn))
    monkeypatch.setattr(router, "_budget_ef", lambda t0: 16)
    route = router.route(queries[4], strategy="hybrid", k=5)
    assert started == [] and route.degraded  # a narrowed beam is a degraded route, as before
