"""Content-addressed weight files and the library directory lock.

Files are named by the sha256 of their bytes (``weights/hot/ab/abcdef...``): a name never comes from user input,
so no tag, description or id can become a path. The store owns only ``weights/`` (and reads the ``blobs/`` and
``cold/`` paths that libraries made before schema 2 recorded); it never lists, sweeps or deletes anything else in
the directory, so a user's own ``blobs/images/photo.jpg`` is never touched. A write goes to a temporary file in the same directory, is fsynced, then
renamed into place (atomic on POSIX); a crash leaves at worst an unreferenced file, collected at the next open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
from pathlib import Path

from smoa.errors import CorruptAdapterError, LibraryLockedError, StorageError

AREAS = ("weights/hot", "weights/cold")
LEGACY_AREAS = ("blobs", "cold")  # schema 1 libraries: read and deleted when their rows go, never swept
_DIGEST = re.compile(r"[0-9a-f]{64}")


class FileStore:
    """Content-addressed files under ``<library>/weights`` (``hot`` for large adapters, ``cold`` for archived and
    merged-away ones). Implements :class:`smoa.storage.base.WeightStore`."""

    def __init__(self, library_dir: Path) -> None:
        self.library_dir = library_dir

    def write(self, area: str, digest: str, data: bytes) -> str:
        """Store ``data`` under ``<area>/<digest[:2]>/<digest>``; returns the relative path. Idempotent."""
        area = {"blobs": "weights/hot", "cold": "weights/cold"}.get(area, area)
        if area not in AREAS or not _DIGEST.fullmatch(digest):
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
        """Delete a file the catalog recorded (only content-addressed paths in the store's areas)."""
        parts = rel.split("/")
        if "/".join(parts[:-2]) not in AREAS + LEGACY_AREAS or not _DIGEST.fullmatch(parts[-1]):
            return  # not a path this store writes: never delete it
        _silent_unlink(self._resolve(rel))

    def owned_files(self, areas: tuple[str, ...] = AREAS) -> set[str]:
        """Every content-addressed file (``<area>/ab/<sha256>``) in ``areas``."""
        out: set[str] = set()
        for area in areas:
            root = self.library_dir / area
            if root.is_dir():
                for p in root.glob("[0-9a-f][0-9a-f]/*"):
                    if _DIGEST.fullmatch(p.name) and p.parent.name == p.name[:2] and p.is_file():
                        out.add(f"{area}/{p.parent.name}/{p.name}")
        return out

    all_files = owned_files

    def holds_weights(self) -> bool:
        """Whether the directory holds weight files of a library (new or legacy layout)."""
        return bool(self.owned_files(AREAS + LEGACY_AREAS))

    def collect_garbage(self, referenced: set[str]) -> int:
        """Delete files in ``weights/`` no catalog row references, and leftover temp files; returns the count."""
        removed = 0
        for rel in self.owned_files() - referenced:
            self.delete(rel)
            removed += 1
        for area in AREAS:
            for tmp in (self.library_dir / area).glob("[0-9a-f][0-9a-f]/.tmp-*"):
                _silent_unlink(tmp)
                removed += 1
        return removed

    def close(self) -> None:
        """Nothing to release (files are opened per call)."""

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
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Lock ``LOCK`` and the directory itself (so deleting ``LOCK`` does not let a second process in)."""
        try:
            fds = [os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), os.open(self.path.parent, os.O_RDONLY)]
        except OSError as exc:
            raise StorageError(f"cannot lock {str(self.path)!r}: {exc.strerror or exc}") from exc
        try:
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LibraryLockedError(
                    f"library {str(self.path.parent)!r} is open in another process; close it there first"
                ) from None
            raise StorageError(f"cannot lock {str(self.path)!r}: {exc}") from exc
        os.ftruncate(fds[0], 0)
        os.write(fds[0], str(os.getpid()).encode())
        self._fds = fds

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            finally:
                os.close(fd)


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
