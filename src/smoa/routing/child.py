"""A router's heavy background work in a child interpreter, so that it does not share the GIL with the routes.

Inside the serving process, a thread that runs torch beside routes served back to back waits for the GIL after
each operator: torch hands it back while it computes, and takes it back only when the thread serving routes lets
go of it, up to Python's switch interval (5 ms) later. A key fit runs thousands of small operators: beside routes
(CLINC150's first 20 intents x 50 examples) its fit took **263 s** instead of ~1 s alone (a scratch timeline,
``docs/bench_routing.md``). In a child it has its own interpreter, and on a second core it costs the routes nothing.

The protocol (used by :mod:`smoa.routing.adapt`'s training child and :mod:`smoa.routing.learner`'s key fits)::

    parent: a private temporary directory <- the request (JSON, .npy / .npz arrays; never a pickle)
            python -c "from <module> import <entry>; <entry>(<directory>)"   (not a fork: torch and the caller's
                                                                              threads do not survive one; not
                                                                              multiprocessing: its spawn re-runs
                                                                              the caller's __main__)
    child:  at nice CHILD_NICE from its start, reads the request, writes its results (each file written whole, then renamed)
    parent: waits (a set ``stop`` kills the child), reads the results back with a strict reader, checks them

A child that cannot be started raises :class:`NoChild` (callers then do the work in this thread); one that fails
raises ``RuntimeError`` with the end of its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

CHILD_NICE = 10  # the scheduler favours the routes' process (bench_adapt_load.py: the same as nice 0 on 2 idle cores)


class NoChild(OSError):
    """The child interpreter could not be started."""


def run_child(entry: str, directory: Path, threads: int = 1, stop: threading.Event | None = None,
              nice: int = CHILD_NICE) -> int | None:  # fmt: skip
    """Run ``entry`` (``"package.module:function"``, called with ``directory`` as its one argument) in a fresh
    ``python`` at ``nice`` (set before it imports anything: its imports take ~1.5 s of CPU), with ``threads`` OpenMP
    / MKL threads and its output in ``directory / "log.txt"``. Returns its exit code, or ``None`` when ``stop`` was
    set (the child is then killed). The child never outlives the call."""
    module, func = entry.split(":")
    lower = f"os.nice({int(nice)}); " if nice and hasattr(os, "nice") else ""
    code = f"import os, sys; {lower}from {module} import {func}; {func}(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # fmt: skip
    with (directory / "log.txt").open("wb") as log:
        try:
            child = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        except OSError as exc:
            raise NoChild(f"{type(exc).__name__}: {exc}") from None
        try:
            while True:
                try:
                    return child.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        return None
        finally:
            if child.poll() is None:  # stopped, or this thread was interrupted: the child must not outlive the request
                child.kill()
                child.wait()


def child_failed(what: str, directory: Path, rc: int | None) -> RuntimeError:
    """The error for a child that exited ``rc`` without its results: ``what`` and the end of its output."""
    try:
        tail = (directory / "log.txt").read_bytes()[-2000:].decode("utf-8", "replace")
    except OSError:
        tail = "(no output)"
    return RuntimeError(f"{what} process failed (exit {rc}): {tail}")
