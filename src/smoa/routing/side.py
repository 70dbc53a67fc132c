"""A route's helper thread: the steps that do not need the HNSW walk's result run beside it.

faiss releases the GIL for the whole walk (~0.45 ms p50 at 1M keys, ``docs/bench_routing.md``), so while the
route's thread walks the graph, a second thread can run Python: HYBRID's tag side (the query's words, the
adapters holding its rarest terms, their exact scores and the tag scores) and the small-group rescue. Those steps
cost ~0.3 ms at 1M keys after the walk; beside it they cost the route only the hand-over (tens of microseconds).

One daemon thread per router, started on first use and again in a forked child (threads do not survive a fork),
stopped when the router is closed or collected. Jobs are plain callables; each :meth:`SideThread.start` returns a
:class:`Pending` with its own result queue, so a route interrupted while waiting never sees another route's result.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity masks
        return os.cpu_count() or 1


class Pending(Generic[T]):
    """The result of one job on the side thread."""

    __slots__ = ("_out", "_done", "_ok", "_value")

    def __init__(self, out: queue.SimpleQueue) -> None:
        self._out = out
        self._done = False
        self._ok = False
        self._value: Any = None

    def wait(self) -> None:
        """Block until the job has ended (its exception, if any, is kept for :meth:`result`)."""
        if not self._done:
            self._ok, self._value = self._out.get()
            self._done = True

    def result(self) -> T:
        """The job's return value; its exception is raised here, on the caller's thread."""
        self.wait()
        if not self._ok:
            raise self._value
        return self._value


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        item = jobs.get()
        if item is None:
            return
        fn, out = item
        try:
            out.put((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            out.put((False, exc))
        del item, fn, out  # the job's closure (and the router it holds) must not outlive the job


class SideThread:
    """A single helper thread that runs one job at a time for the routes of one router."""

    def __init__(self, name: str = "smoa-route-side") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def start(self, fn: Callable[[], T]) -> Pending[T]:
        """Run ``fn`` on the helper thread; the caller must :meth:`Pending.wait` before it changes what ``fn`` reads."""
        if self._pid != os.getpid():  # first use, or a forked child of the process that started the thread
            with self._lock:
                if self._pid != os.getpid():
                    self._jobs = queue.SimpleQueue()
                    threading.Thread(target=_serve, args=(self._jobs,), name=self._name, daemon=True).start()
                    self._pid = os.getpid()
        out: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((fn, out))  # type: ignore[union-attr]
        return Pending(out)

    def close(self) -> None:
        """Stop the helper thread (after the jobs already handed to it); a later :meth:`start` starts a new one."""
        with self._lock:
            if self._jobs is not None and self._pid == os.getpid():
                self._jobs.put(None)
            self._jobs, self._pid = None, -1
