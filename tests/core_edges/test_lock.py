"""Deleting the `LOCK` file must not let a second opener in (issue 10 rough edge)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smoa import LibraryLockedError

from .helpers import open_lib

PROBE = """
import sys
from smoa.errors import LibraryLockedError
from smoa.storage.files import DirectoryLock
from pathlib import Path
lock = DirectoryLock(Path(sys.argv[1]))
try:
    lock.acquire()
except LibraryLockedError:
    print("locked")
else:
    print("acquired")
"""


def test_deleting_lock_does_not_let_a_second_opener_in(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    with open_lib(path) as smoa:
        smoa.create_adapter_sync("domain", ["a"])
        (path / "LOCK").unlink()
        with pytest.raises(LibraryLockedError):
            open_lib(path)
        done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "locked", done.stderr
    with open_lib(path) as smoa:  # released on close
        assert smoa.get_statistics()["library"]["total_adapters"] == 1
