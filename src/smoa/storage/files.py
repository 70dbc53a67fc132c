"""Content-addressed weight files and the library directory lock.

Files are named by the sha256 of their bytes (``blobs/ab/abcdef...``): a name never comes from user input, so no
tag, description or id can become a path. A write goes to a temporary file in the same directory, is fsynced, then
renamed into place (atomic on POSIX); a crash leaves at worst an unreferenced file, collected at the next open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from smoa.errors import CorruptAdapterError, LibraryLockedError, StorageError


class FileStore:
    """Content-addressed files under ``root`` (``blobs`` for large adapters, ``cold`` for archived ones)."""

    def __init__(self, library_dir: Path) -> None:
        self.library_dir = library_dir

    def write(self, area: str, digest: str, data: bytes) -> str:
        """Store ``data`` under ``<area>/<digest[:2]>/<digest>``; returns the relative path. Idempotent."""
        if area not in ("blobs", "cold") or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise StorageError(f"invalid blob address {area!r}/{digest!r}")
        rel = f"{area}/{digest[:2]}/{digest}"
        path = self.library_dir / rel
        if path.exists() and path.stat().st_size == len(data):
            return rel
        try:  # mkdir / mkstemp fail on a full or read-only disk too: the same clear StorageError
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise StorageError(f"could not write weight file {rel!r}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            _silent_unlink(Path(tmp))
            raise StorageError(f"could not write weight file {rel!r}: {exc.strerror or exc}") from exc
        return rel

    def read(self, rel: str, *, name: str) -> bytes:
        path = self._resolve(rel, name=name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CorruptAdapterError(f"{name}: weight file {rel!r} is missing") from None
        except OSError as exc:
            raise StorageError(f"{name}: cannot read weight file {rel!r}: {exc}") from exc

    def delete(self, rel: str) -> None:
        _silent_unlink(self._resolve(rel))

    def all_files(self) -> set[str]:
        out: set[str] = set()
        for area in ("blobs", "cold"):
            root = self.library_dir / area
            if root.is_dir():
                for p in root.glob("*/*"):
                    out.add(str(p.relative_to(self.library_dir)))
        return out

    def collect_garbage(self, referenced: set[str]) -> int:
        """Delete files no catalog row references and leftover temp files; returns how many were removed."""
        removed = 0
        for rel in self.all_files() - referenced:
            self.delete(rel)
            removed += 1
        for area in ("blobs", "cold"):
            for tmp in (self.library_dir / area).glob("*/.tmp-*"):
                _silent_unlink(tmp)
                removed += 1
        return removed

    def _resolve(self, rel: str, name: str = "") -> Path:
        path = (self.library_dir / rel).resolve()
        if not str(path).startswith(str(self.library_dir.resolve()) + os.sep):
            who = f"{name}: " if name else ""  # the adapter it belongs to, so the caller knows which one is bad
            raise CorruptAdapterError(f"{who}weight file reference {rel!r} points outside the library")
        return path


class DirectoryLock:
    """An exclusive ``flock`` on ``<dir>/LOCK``: one process opens a library at a time.

    SQLite's WAL would let two processes write safely, but the router's in-memory indexes and the weight cache
    of one process would not see the other's changes; so a second opener is refused with a clear error. The OS
    releases the lock when the process dies (SIGKILL included), so a crash never leaves a stale lock.
    """

    def __init__(self, library_dir: Path) -> None:
        self.path = library_dir / "LOCK"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LibraryLockedError(
                    f"library {str(self.path.parent)!r} is open in another process; close it there first"
                ) from None
            raise StorageError(f"cannot lock {str(self.path)!r}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _silent_unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass
