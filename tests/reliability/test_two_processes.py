"""Two processes opening one library directory: the second is refused with LibraryLockedError.

The design (``smoa.storage.files.DirectoryLock``): an exclusive ``flock`` on ``<dir>/LOCK``. SQLite's WAL would
let two writers share the catalog safely, but each process's router index and weight cache would not see the
other's changes, so a second opener is refused with a clear error instead. Tested across real processes
(``subprocess``): refusal while the holder lives (reads, writes and the facade alike), nothing changed by the
refused opener, and the lock released by the kernel when the holder is SIGKILLed (no stale lock to clean up).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smoa import AdapterSpec, LibraryLockedError, SMoAConfig, SparseAdapterMixture

from .helpers import TINY, open_lib, seeded_weights, state

HOLDER = textwrap.dedent(
    """
    import sys, time
    from smoa import AdapterSpec, SMoAConfig
    from smoa.library import AdapterLibrary
    from smoa.adapter.profile import BaseProfile
    TINY = BaseProfile("tiny", tuple((f"layers.{i}.{n}", 64, o) for i in range(4) for n, o in (("q", 64), ("v", 32))))
    lib = AdapterLibrary(SMoAConfig(storage_path=sys.argv[1], blob_inline_max_bytes=1500), TINY)
    ad = lib.create(AdapterSpec(rank=2, domain_tags=["held"]))
    print("READY", ad.id, flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(120)
    else:  # keep writing until killed
        while True:
            lib.create_many([AdapterSpec(rank=2) for _ in range(20)])
    """
)
OPENER = textwrap.dedent(
    """
    import sys
    from smoa import LibraryLockedError, SMoAConfig
    from smoa.library import AdapterLibrary
    from smoa.adapter.profile import BaseProfile
    TINY = BaseProfile("tiny", tuple((f"layers.{i}.{n}", 64, o) for i in range(4) for n, o in (("q", 64), ("v", 32))))
    try:
        lib = AdapterLibrary(SMoAConfig(storage_path=sys.argv[1], blob_inline_max_bytes=1500), TINY)
    except LibraryLockedError as exc:
        print("LOCKED", exc)
        sys.exit(3)
    print("OPENED", lib.total_adapters)
    lib.close()
    """
)


def _start_holder(path: Path, mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", line
    return proc, line[1]


def _open_in_other_process(path: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", OPENER, str(path)], capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize("mode", ["sleep", "writing"])
def test_second_process_is_refused_then_admitted_after_sigkill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "lib"
    holder, held_id = _start_holder(path, mode)
    try:
        rc, out = _open_in_other_process(path)
        assert rc == 3 and "LOCKED" in out and "open in another process" in out, out
        assert str(path) in out  # the error names the directory
        with pytest.raises(LibraryLockedError):  # this process too, library and facade alike
            open_lib(path)
        with pytest.raises(LibraryLockedError):
            SparseAdapterMixture(SMoAConfig(storage_path=path, base_profile=TINY, encoder="hash"))
        assert (path / "LOCK").read_text() == str(holder.pid)  # who holds it, for the operator
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lib = open_lib(path)  # another process than the killed holder: the kernel dropped the flock with it
    assert held_id in lib and lib.get_adapter(held_id).domain_tags == ["held"]
    lib.close()


def test_refused_opener_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    lib = open_lib(path)
    lib.create(AdapterSpec(weights=seeded_weights(1, ("layers.0.q",), rank=8)))  # a blob file too
    before = state(lib)
    lib.close()
    holder, _ = _start_holder(path, "sleep")
    try:
        rc, _out = _open_in_other_process(path)
        assert rc == 3
        with pytest.raises(LibraryLockedError):
            open_lib(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lib = open_lib(path)
    after = state(lib)
    # the holder added its one adapter; everything that existed before is untouched
    for table in ("weights", "tags"):
        assert set(before[table]) <= set(after[table])
    assert all(f in after["files"] for f in before["files"])
    lib.close()


def test_same_process_second_open_is_refused_and_close_releases(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    lib = open_lib(path)
    with pytest.raises(LibraryLockedError):
        open_lib(path)  # flock is per open file description: a second open in one process is refused too
    lib.close()
    again = open_lib(path)
    again.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_lock_released_by_sigkill_mid_write_many_times(tmp_path: Path) -> None:
    """Kill a forked writer 10 times at random moments; each time the next open succeeds at once."""
    import random

    path = tmp_path / "lib"
    open_lib(path).close()
    rng = random.Random(7)
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                lib = open_lib(path)
                while True:
                    lib.create_many([AdapterSpec(rank=2) for _ in range(10)])
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t0 = time.perf_counter()
        lib = open_lib(path)
        assert time.perf_counter() - t0 < 5.0
        lib.close()
