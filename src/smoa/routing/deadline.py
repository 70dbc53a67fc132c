"""A deadline on the main encoder's run (issue 11, item 6): an escalation that would end past the latency budget is
cut off where it stands, and the route keeps the fast answer it already has (``degraded``).

The escalation decision is a prediction (:class:`~smoa.routing.costs.EncoderCost`: the median of recent runs), and
the encoder's tail is long on a shared machine (int8 MiniLM on 12 tokens: p50 3.5 ms, p99 6.7 ms,
``benchmarks/bench_query_encoder.py``). Without a deadline a budget bounded the median escalation, not the slow
ones: 10 ms budget, 1M keys, p99 10.1 ms. With one, a run still going at ``deadline`` is stopped through
onnxruntime's ``RunOptions.terminate``, which the runtime checks between graph nodes, and raises
:class:`EncodeCancelled`. A stopped 40-token run returns 0.51 ms after its deadline at p50, 1.19 ms at p99
(``benchmarks/bench_deadline.py``); the router holds back what such stops overran
(:meth:`~smoa.routing.costs.EncoderCost.deadline`).

One daemon thread serves every deadline of a router (routes are computed one at a time under its lock). Arming it
wakes it once (a notify); disarming costs nothing: it wakes at the old deadline, finds nothing armed and sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class EncodeCancelled(Exception):
    """The encoder's run reached its deadline and was stopped (internal to the router: the route falls back)."""


class Watchdog:
    """Stops an onnxruntime run at its deadline (``time.perf_counter()`` seconds)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[Any, float] | None = None  # (RunOptions, deadline)
        self._thread: threading.Thread | None = None
        self.fired = 0

    def run(self, fn: Callable[[Any], T], deadline: float) -> T:
        """``fn(run_options)`` with the run stopped at ``deadline``.

        Raises:
            EncodeCancelled: the deadline passed first (or had passed already: then ``fn`` is not called).
        """
        import onnxruntime as ort

        if time.perf_counter() >= deadline:
            raise EncodeCancelled("the deadline had passed")
        options = ort.RunOptions()
        armed = (options, deadline)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="smoa-encode-deadline", daemon=True)
                self._thread.start()
            self._armed = armed
            self._cond.notify()
        try:
            return fn(options)
        except Exception as exc:
            if options.terminate:
                raise EncodeCancelled(str(exc)) from None
            raise
        finally:
            with self._cond:
                if self._armed is armed:
                    self._armed = None

    def close(self) -> None:
        """Stop the thread (a later :meth:`run` starts another)."""
        with self._cond:
            self._thread = None
            self._cond.notify_all()

    def _watch(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                if self._armed is None:
                    self._cond.wait()
                    continue
                options, deadline = self._armed
                left = deadline - time.perf_counter()
                if left > 0:
                    self._cond.wait(left)
                    continue
                options.terminate = True
                self._armed = None
                self.fired += 1


__all__ = ["EncodeCancelled", "Watchdog"]
