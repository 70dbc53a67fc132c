"""Online cost models behind the router's latency budget (issue 11, item 6): they let a route choose the
cheapest path that fits *before* it starts, instead of noticing afterwards that the budget was spent.

* :class:`EncoderCost` predicts what the main (int8 MiniLM) encoder costs on a text: ``base + per_char * (chars -
  64)``, both terms medians of recent samples, re-measured in the background when a refused escalation might
  rest on a stale figure, and now and then by a refused escalation run anyway under its deadline (:meth:`explore`).
* :class:`SideChoice` says whether HYBRID's walk-free steps run beside the walk on the side thread
  (:mod:`smoa.routing.side`) or after it, whichever recently took less time.
* :class:`WalkCost` predicts what an HNSW walk costs per unit of efSearch and what the steps after it (the
  small-group rescue, HYBRID's tag side) cost, and picks the widest beam that fits what is left of a budget (less
  what its recent plans under-predicted); it also says whether the tag side still fits.

Both are plain state. The router reads and updates them under its own lock (a route is computed under it);
only :meth:`EncoderCost.probe`'s background thread writes outside it, to a deque, where a lost race costs at most
one sample.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

COST_SAMPLES = 16  # recent main-encoder timings per cost term (short texts / per character)
LONG_TEXT_CHARS = 128  # texts from this length on teach the main encoder's per-character cost
COST_PROBE_RUNS = 3  # timed encodes per probe (the fastest counts)
COST_PROBE_INTERVAL_S = 5.0  # at most one background re-measure of the main encoder's cost per this many seconds
COST_EXPLORE_EVERY = 16  # a refused escalation that could still end in time runs anyway once per this many refusals
SEARCH_COST_SAMPLES = 64  # recent HNSW walks (ms per efSearch unit) and post-walk steps the beam choice uses
EF_MIN = 16  # the narrowest beam a tight budget may choose
WALK_COST_PERCENTILE = 90  # the beam is planned on slow walks (this percentile of recent costs)
PLAN_ERROR_SAMPLES = 256  # recent (actual - planned) ms from a beam's plan to the end of the route
# ... held back from the budget: a budget bounds the tail of routes (their p99), not their median. Holding back the
# errors' own p99 aimed the routes' p99 at the budget itself, so half the runs ended just past it (1M keys, 1 ms:
# p99 1.007 ms; 99.5 of 256: 0.979 ms, the same top-1; bench_routing.py --budgets, docs/bench_routing.md)
PLAN_ERROR_PERCENTILE = 99.5
PLAN_ERROR_MIN_SAMPLES = 16
TAG_EXPLORE_EVERY = 128  # a tag side refused this many times runs once anyway: its cost model stays current
SIDE_SAMPLES = 64  # recent HYBRID walk-and-tag phases (ms) per mode, serial and beside the walk (SideChoice)
SIDE_MIN_SAMPLES = 8  # each mode runs until it has this many; then the faster one, the other now and then
SIDE_EXPLORE_EVERY = 512  # ... once per this many routes (1 in 128 moved a 1M-key p99 by 0.1 ms: 0.8 % slower routes)
SIDE_EXPLORE_WARM = 8  # ... once per this many while its window is not full yet: a choice made on 8 noisy first
# timings per mode, where the two differ by less than their spread, kept the slower mode for thousands of routes
SIDE_CLEAR_SAMPLES = 16  # ... unless both modes have this many timings and the chosen one leads clearly:
SIDE_CLEAR_LEAD = 0.05  # the other's median, and that of its last SIDE_CLEAR_SAMPLES // 2, over (1 + this) x its own


class EncoderCost:
    """Predicted milliseconds of the main encoder on one text (``base`` + ``per_char`` past 64 characters)."""

    def __init__(self, base_ms: float = 3.0, per_char_ms: float = 0.02) -> None:
        self.terms = [base_ms, per_char_ms]
        self.samples: tuple[deque, deque] = (deque(maxlen=COST_SAMPLES), deque(maxlen=COST_SAMPLES))
        self._probe_at = -math.inf  # monotonic time of the last background probe
        self._refused = 0  # escalations refused since the last exploration (explore)
        self._on_routes: deque[float] = deque(maxlen=COST_SAMPLES)  # short-text base ms of runs that ended in routes
        self._prior = base_ms
        self.overrun = PlanError()  # ms routes ran past their deadline plan (deadline)

    def predict(self, chars: int) -> float:
        base, per_char = self.terms
        return base + per_char * max(0, chars - 64)

    def deadline(self, end: float, reserve_ms: float) -> float:
        """When (``time.perf_counter()`` seconds) the main encoder's run must stop for the route to end by ``end``:
        ``reserve_ms`` (the search after it) held back, and what recent plans overran it by
        (:data:`PLAN_ERROR_PERCENTILE` of :meth:`settle`'s samples, once there are :data:`PLAN_ERROR_MIN_SAMPLES`:
        the watchdog's wake-up, the run's stop between graph nodes, a search slower than the fast path's)."""
        if not math.isfinite(end):  # no budget: nothing to plan
            return end
        at = end - (reserve_ms + self.hold()) / 1e3
        self.overrun.plan(at, reserve_ms)  # the route should end reserve_ms after the deadline
        return at

    def hold(self) -> float:
        """Milliseconds :meth:`deadline` holds back beyond the reserve (:meth:`PlanError.hold`)."""
        return self.overrun.hold()

    def settle(self) -> None:
        """The route ended: learn how far past its deadline plan it ran (no-op without one)."""
        self.overrun.settle()

    def explore(self, left_ms: float, chars: int) -> bool:
        """Whether an escalation the prediction refuses runs anyway, under its deadline
        (:mod:`smoa.routing.deadline`): once per :data:`COST_EXPLORE_EVERY` refusals, when ``left_ms`` covers the
        fastest recent run that ended in a route (before any: the prior ``base_ms``). The model learns from the runs
        it allows, so a median raised by a few cold or disturbed runs (a fresh or idle session's first queries are
        slower: ``benchmarks/bench_deadline.py``) would otherwise refuse for good a budget the encoder fits. Neither
        a stopped run (``stopped``: a lower bound) nor the background probe (``probe``: it runs beside the routes
        and, on two cores, shares them) sets that floor. A run that misses the deadline is stopped, so the budget
        holds."""
        self._refused += 1
        if self._refused < COST_EXPLORE_EVERY:
            return False
        floor = min(self._on_routes, default=self._prior) + self.terms[1] * max(0, chars - 64)
        if left_ms < floor:
            return False
        self._refused = 0
        return True

    def learn(self, chars: int, ms: float, probe: bool = False, stopped: bool = False) -> None:
        """``base`` from texts under :data:`LONG_TEXT_CHARS` (less the per-character part past 64), ``per_char`` from
        longer ones (medians of the last :data:`COST_SAMPLES` samples each: one cold start or burst of load does not
        move it). A text just past 64 characters says nothing of the per-character cost: dividing its excess over a
        stale base by a few characters once predicted 27 ms for a 100-character query and forbade escalating at a
        10 ms budget."""
        short, long_ = self.samples
        if chars < LONG_TEXT_CHARS:
            short.append(max(0.0, ms - self.terms[1] * max(0, chars - 64)))
            if not (probe or stopped):
                self._on_routes.append(short[-1])
            self.terms[0] = float(statistics.median(short))  # numpy's: ~10 us on 16 floats, this ~0.4 us
        else:
            long_.append(max(0.0, (ms - self.terms[0]) / (chars - 64)))
            self.terms[1] = float(statistics.median(long_))

    def probe(self, encode: Callable[[Sequence[str]], object], chars: int, cpu_clock: bool = False) -> None:
        """Re-measure ``encode`` on a filler text of ``chars`` characters in a background thread (at most once per
        :data:`COST_PROBE_INTERVAL_S`): the model only learns from escalations, so one slow sample (a cold start, a
        burst of load) would otherwise forbid escalating for good. ``encode`` must bypass any embedding cache (the
        filler must not be cached). A long text's per-character cost is measured against a base measured first.

        ``cpu_clock``: time the probe on its thread's CPU clock, for an encoder that computes on the calling thread
        alone (``cpu_bound``). The probe shares the GIL with routes in flight; on the wall clock it measured their
        Python as well (a busy 1M-key router: 6-10 ms for a 4-5 ms encoder), which then refused every escalation at
        a 10 ms budget. An encoder that waits on something else (a GPU, a remote service) keeps the wall clock."""
        clock = time.thread_time if cpu_clock else time.perf_counter
        now = time.monotonic()
        if now - self._probe_at < COST_PROBE_INTERVAL_S:
            return
        self._probe_at = now

        def run() -> None:
            try:
                for n in ([48] if chars >= LONG_TEXT_CHARS else []) + [max(1, chars)]:
                    filler = ("route this query " * (n // 17 + 1))[:n]
                    encode([filler])  # warm-up, not timed
                    best = math.inf
                    for _ in range(COST_PROBE_RUNS):  # the least disturbed run: this thread shares the GIL with routes
                        t = clock()
                        encode([filler])
                        best = min(best, (clock() - t) * 1e3)
                    self.learn(n, best, probe=True)
            except Exception as exc:  # noqa: BLE001 -- a failed probe leaves the model as it was
                logger.debug("smoa routing: cost probe failed (%s)", exc)

        threading.Thread(target=run, name="smoa-cost-probe", daemon=True).start()


class WalkCost:
    """Recent HNSW walks (ms per efSearch unit), the ms of the steps after each walk, and the plan's own error.

    The linear model misses a walk's fixed part (the descent through the upper layers: ~0.13 ms of a 1M-key walk
    even at efSearch 16), the Python between the steps and the machine's jitter. So each plan is checked: from
    :meth:`beam` to :meth:`settle` (the end of the route) the route took ``actual`` ms where the plan
    said ``planned``; the :data:`PLAN_ERROR_PERCENTILE` of ``actual - planned`` over the last
    :data:`PLAN_ERROR_SAMPLES` plans is held back from the next budget (0.1-0.4 ms on 1M keys at a 1 ms budget,
    where the beam then sits at :data:`EF_MIN` anyway: the floor there is the narrowest walk plus the Python around
    it, ``docs/bench_routing.md``). HYBRID's tag side has its own reserve (:meth:`tag_fits`).
    """

    def __init__(self) -> None:
        self.per_ef = Window(SEARCH_COST_SAMPLES)
        self.after = Window(SEARCH_COST_SAMPLES)
        self.error = PlanError()  # what beam plans under-predicted, to each route's end
        self.tag = Window(SEARCH_COST_SAMPLES)  # ms of HYBRID's tag side
        self.tail = Window(SEARCH_COST_SAMPLES)  # ms from a tag side's end to the route's end
        self._refused = 0  # tag sides refused since the last one that ran (tag_fits)

    def record(self, walk_ms: float, beam: int, after_ms: float) -> None:
        self.per_ef.append(walk_ms / max(1, beam))
        self.after.append(after_ms)

    def add_after(self, ms: float) -> None:
        """Charge ``ms`` more to the latest walk's post-walk steps (the tag side runs after the search returned)."""
        if self.after:
            self.after.add_to_last(ms)

    def beam(self, left_ms: float, full: int) -> int | None:
        """The beam that fits ``left_ms``, or ``None`` for the ``full`` beam (it fits, no budget, or fewer than 8
        walks measured): the widest multiple of 16 (>= :data:`EF_MIN`) whose predicted walk plus the post-walk
        steps (:data:`WALK_COST_PERCENTILE` of recent routes: a budget bounds the slow routes, not the typical one)
        ends within the budget."""
        self.error.drop()
        if not math.isfinite(left_ms) or len(self.per_ef) < 8:
            return None
        per_ef, after = self.per_ef.percentile(WALK_COST_PERCENTILE), self.after.percentile(WALK_COST_PERCENTILE)
        left = left_ms - after - self.slack()
        ef = None if per_ef * full <= left else int(min(full - 16, max(EF_MIN, 16 * (left / per_ef // 16))))
        self.error.plan(time.perf_counter(), per_ef * (ef or full) + after)
        return ef

    def tag_done(self, ms: float) -> None:
        self.tag.append(ms)

    def tail_done(self, ms: float) -> None:
        self.tail.append(ms)

    def tag_fits(self, left_ms: float) -> bool:
        """Whether HYBRID's tag side and what follows it fit in ``left_ms`` (:meth:`tag_reserve`). Only routes that
        run it measure it, so one refused :data:`TAG_EXPLORE_EVERY` times in a row runs anyway (under 1 % of
        routes): a few slow early samples must not refuse it for good."""
        if left_ms <= 0:
            return False
        if not math.isfinite(left_ms) or self.tag_reserve() <= left_ms:
            return True
        self._refused += 1
        if self._refused >= TAG_EXPLORE_EVERY:
            self._refused = 0
            return True
        return False

    def tag_reserve(self) -> float:
        """Milliseconds a route needs for HYBRID's tag side and what follows it (:data:`WALK_COST_PERCENTILE` of
        each), 0 until 8 of both were measured."""
        if len(self.tag) < 8 or len(self.tail) < 8:
            return 0.0
        return self.tag.percentile(WALK_COST_PERCENTILE) + self.tail.percentile(WALK_COST_PERCENTILE)

    def slack(self) -> float:
        """Milliseconds held back from a budget: what recent plans under-predicted (:meth:`PlanError.hold`)."""
        return self.error.hold()

    def settle(self) -> None:
        """The route ended: learn the pending plan's error (no-op without one)."""
        self.error.settle()


class PlanError:
    """How far routes ran past their plans, for the beam's plan (:class:`WalkCost`) and the deadline's
    (:class:`EncoderCost`): :meth:`plan` at the plan, :meth:`settle` at the route's end learns ``actual - planned``
    ms; :meth:`hold` is what to hold back from the next budget. Not thread-safe: the router updates it under its
    lock."""

    __slots__ = ("samples", "_plan")

    def __init__(self) -> None:
        self.samples = Window(PLAN_ERROR_SAMPLES)
        self._plan: tuple[float, float] | None = None  # (perf_counter at the plan, planned ms from then to the end)

    def plan(self, start: float, planned_ms: float) -> None:
        self._plan = (start, planned_ms)

    def drop(self) -> None:
        """Forget the pending plan (the route made none)."""
        self._plan = None

    def hold(self) -> float:
        """:data:`PLAN_ERROR_PERCENTILE` of the last :data:`PLAN_ERROR_SAMPLES` errors, 0 until
        :data:`PLAN_ERROR_MIN_SAMPLES` plans were checked, never negative."""
        if len(self.samples) < PLAN_ERROR_MIN_SAMPLES:
            return 0.0
        return max(0.0, self.samples.percentile(PLAN_ERROR_PERCENTILE))

    def settle(self) -> None:
        """The route ended: learn the pending plan's error (no-op without one)."""
        if self._plan is not None:
            start, planned = self._plan
            self._plan = None
            actual = (time.perf_counter() - start) * 1e3
            if actual < 1e3:  # a plan left by a route that failed before its end says nothing
                self.samples.append(actual - planned)


class SideChoice:
    """Whether a HYBRID route over an HNSW index runs its walk-free steps beside the walk (``True``) or after it.

    The gain depends on the walk's length and on what a hand-over costs on this machine. On the 2-vCPU KVM box of
    ``docs/bench_routing.md`` waking the side thread took ~0.12 ms: beside a 1M-key walk (~0.45 ms) the side ran
    free, beside a 10K-key walk (~0.08 ms) the route waited for it and was ~0.25 ms slower. So the router times
    both: the phase from the walk's start to the fused scores (wall ms on the route's thread), one window per
    mode. Each mode runs until it has :data:`SIDE_MIN_SAMPLES`; then the one with the lower median, and the
    other once per :data:`SIDE_EXPLORE_WARM` routes until its window is full (:data:`SIDE_SAMPLES`: a choice made on
    a few first timings is soon checked), then once per :data:`SIDE_EXPLORE_EVERY` routes so its window follows
    the machine's load and the index's growth. The warm phase ends sooner when the choice is clear: both modes
    have :data:`SIDE_CLEAR_SAMPLES` timings and the other's median, and that of its latest half of those, are over
    ``1 +`` :data:`SIDE_CLEAR_LEAD` times the chosen one's (the latest ones too: first timings on a cold side
    thread must not settle the choice against it). At 1M keys the side thread leads by ~20 %: a fresh router
    served 4.8 % rather than 11.6 % of its first 500 routes in the slower mode (a scratch A/B, ``docs/bench_routing.md``).
    Both modes give the same scores, float for float: only the time differs.
    """

    def __init__(self) -> None:
        self.ms = {False: Window(SIDE_SAMPLES), True: Window(SIDE_SAMPLES)}
        self._routes = 0

    def pick(self) -> bool:
        self._routes += 1
        after, beside = self.ms[False], self.ms[True]
        if len(after) < SIDE_MIN_SAMPLES or len(beside) < SIDE_MIN_SAMPLES:
            return len(beside) <= len(after)
        best = beside.percentile(50) < after.percentile(50)
        chosen, other = (beside, after) if best else (after, beside)
        every = SIDE_EXPLORE_EVERY if len(other) >= SIDE_SAMPLES or self._clear(chosen, other) else SIDE_EXPLORE_WARM
        return (not best) if self._routes % every == 0 else best

    @staticmethod
    def _clear(chosen: Window, other: Window) -> bool:
        """Whether ``chosen`` leads ``other`` clearly enough to end the warm phase (class docstring)."""
        if len(other) < SIDE_CLEAR_SAMPLES or len(chosen) < SIDE_CLEAR_SAMPLES:
            return False
        bar = (1.0 + SIDE_CLEAR_LEAD) * chosen.percentile(50)
        return other.percentile(50) > bar and other.latest_percentile(SIDE_CLEAR_SAMPLES // 2, 50) > bar

    def record(self, beside: bool, ms: float) -> None:
        self.ms[beside].append(ms)


class Window:
    """The last ``size`` samples (ms, finite), kept in arrival order and sorted at once: a route reads four
    percentiles and appends three samples, so sorting them on each read (~3 us each, plus the Python around it)
    cost ~30 us of a 1M-key route at a 1 ms budget; an insertion into the sorted copy is one ``bisect`` and a
    memmove of at most ``size`` pointers. Not thread-safe: the router updates it under its lock."""

    __slots__ = ("_recent", "_sorted")

    def __init__(self, size: int) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []

    def append(self, x: float) -> None:
        x = float(x)
        if len(self._recent) == self._recent.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent[0])]
        self._recent.append(x)
        bisect.insort(self._sorted, x)

    def extend(self, xs: Iterable[float]) -> None:
        for x in xs:
            self.append(x)

    def add_to_last(self, ms: float) -> None:
        """Add ``ms`` to the newest sample."""
        last = self._recent[-1]
        del self._sorted[bisect.bisect_left(self._sorted, last)]
        self._recent[-1] = last + ms
        bisect.insort(self._sorted, last + ms)

    def percentile(self, q: float) -> float:
        """``np.percentile(samples, q)`` (linear interpolation), 0 without samples."""
        return _interpolate(self._sorted, q)

    def latest_percentile(self, m: int, q: float) -> float:
        """:meth:`percentile` of the newest ``m`` samples only."""
        return _interpolate(sorted(itertools.islice(reversed(self._recent), m)), q)

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[float]:
        return iter(self._recent)

    def __getitem__(self, i: int) -> float:
        return self._recent[i]


def _interpolate(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of the sorted ``xs`` (linear interpolation), 0 when empty."""
    if not xs:
        return 0.0
    at = (len(xs) - 1) * q / 100.0
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


__all__ = ["EncoderCost", "PlanError", "WalkCost", "Window"]
