"""A router's heavy background work in a child interpreter, so that it does not share the GIL with the routes.

Inside the serving process, a thread that runs torch beside routes served back to back waits for the GIL after
each operator: torch hands it back while it computes, and takes it back only when the thread serving routes lets
go of it, up to Python's switch interval (5 ms) later. A key fit runs thousands of small operators: beside routes
(CLINC150's first 20 intents x 50 examples) one took **263 s** in a scratch run of what is now
``benchmarks/bench_adapt_timeline.py``, against 2.2-4.1 s in others (``docs/bench_routing.md``). In a child it has
its own interpreter and, on a second core, its own CPU.

The protocol (used by :mod:`smoa.routing.adapt`'s training child, :mod:`smoa.routing.learner`'s key fits and
projection tuning)::

    parent: a private temporary directory <- the request (JSON, .npy / .npz arrays; never a pickle)
            python -c "from <module> import <entry>; <entry>(<directory>)"   (not a fork: torch and the caller's
                                                                              threads do not survive one; not
                                                                              multiprocessing: its spawn re-runs
                                                                              the caller's __main__)
    child:  at nice CHILD_NICE from its start, reads the request, writes its results (each file written whole,
            then renamed)
    parent: waits (a set ``stop`` kills the child), reads the results back with a strict reader, checks them

A child that cannot be started raises :class:`NoChild` (callers then do the work in this thread); one that fails
raises ``RuntimeError`` with the end of its output. :func:`call_arrays` is that round trip for a pure function of
numpy arrays (a key fit, the projection's tuning): ``request.npz`` + ``request.json`` in, ``result.npz`` out, both
read with ``allow_pickle=False``; the caller checks what it gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

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


def call_arrays(entry: str, what: str, arrays: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Run ``entry`` in a child on ``arrays`` (one ``.npz``) and ``params`` (JSON); the arrays it wrote with
    :func:`write_result`. ``NoChild`` if it cannot start; ``RuntimeError`` naming ``what`` if it fails, writes
    nothing or writes an unreadable file."""
    with tempfile.TemporaryDirectory(prefix="smoa-child-") as tmp:
        out = Path(tmp)
        np.savez(out / "request.npz", **arrays)
        (out / "request.json").write_text(json.dumps(params))
        rc = run_child(entry, out)
        if rc != 0 or not (out / "result.npz").is_file():
            raise child_failed(what, out, rc)
        try:
            with np.load(out / "result.npz", allow_pickle=False) as got:
                return {name: got[name] for name in got.files}
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"{what} process gave an unreadable result ({type(exc).__name__}: {exc})") from None


def read_request(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """In the child: the arrays and the parameters :func:`call_arrays` sent."""
    out = Path(directory)
    with np.load(out / "request.npz", allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return arrays, json.loads((out / "request.json").read_text())


def write_result(directory: str, arrays: dict[str, np.ndarray]) -> None:
    """In the child: the result arrays, written whole and then renamed (the parent reads only a finished file)."""
    out = Path(directory)
    with (out / "result.tmp").open("wb") as f:
        np.savez(f, **arrays)
    (out / "result.tmp").replace(out / "result.npz")
