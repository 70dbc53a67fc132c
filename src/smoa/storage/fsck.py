"""`smoa fsck`: check a library directory's catalog against its weight files, and rebuild a lost catalog.

Check (``repair=False``, never writes)::

    catalog.sqlite3  ── missing / empty / unreadable?  (integrity check, schema)
        │ every row with weights:  inline BLOB or file  ── file exists? ── sha256 == row checksum? ── parses?
        ▼
    weights/hot|cold (and legacy blobs/, cold/)  ── files no row references = orphans

Repair (``repair=True``):

* catalog missing, empty or unreadable: the bad file is moved aside (``catalog.sqlite3.broken-<time>``, with its
  ``-wal``/``-shm``), the router's persisted ``index/`` (derived from the old rows) is dropped, and a fresh catalog
  is built from the weight files: each file's header carries its row
  (:func:`smoa.adapter.safetensors_io.read_adapter_meta`); a file written before row metadata existed comes back
  under a fresh id with ``metadata["recovered_from"]`` naming it. Files in a ``cold`` area come back
  ``archived``; when several files carry one id, the highest ``version`` wins (then a hot copy over a cold one).
* catalog readable: orphan files whose header names an id the catalog lacks are added back as rows.

Not recoverable from files: inline BLOBs (small adapters kept inside the lost catalog), COMPOSITE adapters
(no weights), merge aliases/history, usage counts, routing keys: a rebuilt catalog records the encoder as
:data:`UNKNOWN_ENCODER`, so the core re-encodes every key from the recovered routing texts at the next open.
Rows whose weights are missing or corrupt are reported, never deleted.

The directory lock is held throughout, so fsck never races a process that has the library open.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smoa.errors import CorruptAdapterError, SmoaError, StorageError

CATALOG_NAME = "catalog.sqlite3"
UNKNOWN_ENCODER = "unknown (rebuilt by fsck)"  # differs from every encoder: the core re-encodes every key
INDEX_DIR = "index"  # the router's persisted indexes (smoa.routing): derived, rebuilt from the catalog
_TABLES = ("adapters", "weights", "meta", "tags")


@dataclass
class FsckIssue:
    """One problem found.

    Attributes:
        kind: ``"missing"`` (row's weight file absent), ``"corrupt"`` (checksum/parse failure), ``"orphan"``
            (file no row references), ``"unrecoverable"`` (a file repair could not turn into a row).
        adapter_id: the row's id (or the id a file's header names), if known.
        path: the weight file (relative to the library), if any.
        detail: a human-readable explanation.
    """

    kind: str
    adapter_id: str | None
    path: str | None
    detail: str


@dataclass
class FsckReport:
    """What :func:`fsck` found (and did).

    Attributes:
        path: the library directory.
        catalog: ``"ok"``, ``"missing"``, ``"empty"`` or ``"unreadable"`` (state before any repair).
        catalog_detail: why the catalog is not ok (empty when ok).
        rows: catalog rows checked (0 when the catalog is not ok).
        files: weight files found.
        issues: every problem (missing, corrupt, orphan, unrecoverable).
        repaired: whether a repair wrote anything.
        rebuilt_rows: rows written by the repair.
        moved_aside: where a broken catalog was moved (repair only).
    """

    path: str
    catalog: str = "ok"
    catalog_detail: str = ""
    rows: int = 0
    files: int = 0
    issues: list[FsckIssue] = field(default_factory=list)
    repaired: bool = False
    rebuilt_rows: int = 0
    moved_aside: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[FsckIssue]:
        return [i for i in self.issues if i.kind == kind]

    @property
    def missing(self) -> list[FsckIssue]:
        return self.of_kind("missing")

    @property
    def corrupt(self) -> list[FsckIssue]:
        return self.of_kind("corrupt")

    @property
    def orphans(self) -> list[FsckIssue]:
        return self.of_kind("orphan")

    @property
    def clean(self) -> bool:
        """True when the catalog is ok and every row's weights are present and intact (orphans allowed: the
        library collects them at open)."""
        return self.catalog == "ok" and not self.missing and not self.corrupt

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean"] = self.clean
        return out

    def summary(self) -> str:
        """A few lines for the command line."""
        lines = [f"library {self.path}: catalog {self.catalog}" + (f" ({self.catalog_detail})" if self.catalog_detail else "")]
        lines.append(
            f"  {self.rows} row(s), {self.files} weight file(s); {len(self.missing)} missing, {len(self.corrupt)} corrupt, "
            f"{len(self.orphans)} orphan(s)"
        )
        for issue in self.issues[:50]:
            who = issue.adapter_id or "-"
            lines.append(f"  {issue.kind:<13} {who:<20} {issue.path or '-'}: {issue.detail}")
        if len(self.issues) > 50:
            lines.append(f"  ... and {len(self.issues) - 50} more")
        if self.repaired:
            lines.append(f"  repaired: {self.rebuilt_rows} row(s) rebuilt from weight-file headers")
            lines.extend(f"  moved aside: {p}" for p in self.moved_aside)
        elif not self.clean:
            lines.append(f"  run `smoa fsck {self.path} --repair` to rebuild what the weight files allow")
        return "\n".join(lines)


def holds_library(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a smoa library (a non-empty catalog or weight files)."""
    from smoa.storage.files import AREAS, LEGACY_AREAS, FileStore

    p = Path(path)
    if not p.is_dir():
        return False
    cat = p / CATALOG_NAME
    if cat.is_file() and cat.stat().st_size > 0:
        return True
    return bool(FileStore(p).owned_files(AREAS + LEGACY_AREAS))


def fsck(path: str | Path, repair: bool = False, profile: Any | None = None) -> FsckReport:
    """Check (and with ``repair`` rebuild) the library at ``path`` (module docstring).

    Args:
        path: the library directory.
        repair: rebuild a missing/empty/unreadable catalog from the weight files; add back orphan files whose
            header names an id the catalog lacks.
        profile: the base-model profile to record in a rebuilt catalog (default: the default profile when its
            fingerprint matches the rows; otherwise the core records its own at the next open).

    Raises:
        StorageError: ``path`` holds no library (nothing is created).
        LibraryLockedError: the library is open in another process.
    """
    from smoa.storage.files import DirectoryLock

    root = Path(path).expanduser().absolute()
    if not holds_library(root):
        raise StorageError(f"no smoa library at {str(root)!r} (no catalog, no weight files); nothing was changed")
    lock = DirectoryLock(root)
    lock.acquire()
    try:
        return _fsck_locked(root, repair, profile)
    finally:
        lock.release()


# == checking ==========================================================================================================
def _catalog_state(cat: Path) -> tuple[str, str]:
    if not cat.exists():
        return "missing", f"{CATALOG_NAME} does not exist"
    if cat.stat().st_size == 0:
        return "empty", f"{CATALOG_NAME} is 0 bytes"
    try:
        db = sqlite3.connect(f"file:{cat}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return "unreadable", str(exc)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            return "unreadable", f"integrity check: {check}"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        lacking = [t for t in _TABLES if t not in tables]
        if lacking:
            return ("empty" if not tables else "unreadable"), f"no table(s) {', '.join(lacking)}"
        return "ok", ""
    except sqlite3.Error as exc:
        return "unreadable", str(exc)
    finally:
        db.close()


def _rows(cat: Path) -> list[tuple[str, str, str | None, bytes | None, str]]:
    """``(id, checksum, file, inline blob, specialization)`` of every row that has weights."""
    db = sqlite3.connect(f"file:{cat}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT a.id, a.checksum, w.file, w.data, a.specialization FROM adapters a "
            "LEFT JOIN weights w ON w.key = a.key ORDER BY a.key"
        ).fetchall()
    finally:
        db.close()


def _check_bytes(data: bytes, digest: str, name: str) -> str | None:
    """Why ``data`` is not the row's weights, or ``None`` when it is."""
    from smoa.adapter.weights import LoraWeights, checksum

    try:
        weights = LoraWeights.from_bytes(data, name=name)
    except SmoaError as exc:
        return str(exc).splitlines()[0][:300]
    if digest and checksum(data) != digest:
        canonical = checksum(weights.to_bytes())  # a file's header row is not part of the row's checksum
        if canonical != digest:
            return f"sha256 {canonical[:12]}... of its weights differs from the row's {digest[:12]}..."
    return None


def _check_rows(root: Path, report: FsckReport) -> set[str]:
    """Check every row against its weights; returns the files the rows reference."""
    from smoa.storage.files import FileStore

    store = FileStore(root)
    referenced: set[str] = set()
    rows = _rows(root / CATALOG_NAME)
    report.rows = len(rows)
    for aid, digest, file, blob, specialization in rows:
        if specialization == "composite":
            continue
        if file:
            referenced.add(file)
            try:
                data = store.read(file, name=f"adapter {aid}")
            except CorruptAdapterError as exc:
                kind = "missing" if "missing" in str(exc) else "corrupt"
                report.issues.append(FsckIssue(kind, aid, file, str(exc)))
                continue
            except StorageError as exc:
                report.issues.append(FsckIssue("corrupt", aid, file, str(exc)))
                continue
        elif blob is not None:
            data = bytes(blob)
        else:
            report.issues.append(FsckIssue("missing", aid, None, "the row has neither an inline BLOB nor a file"))
            continue
        problem = _check_bytes(data, digest, f"adapter {aid}")
        if problem is not None:
            report.issues.append(FsckIssue("corrupt", aid, file, problem))
    return referenced


def _fsck_locked(root: Path, repair: bool, profile: Any | None) -> FsckReport:
    from smoa.storage.files import AREAS, LEGACY_AREAS, FileStore

    report = FsckReport(path=str(root))
    report.catalog, report.catalog_detail = _catalog_state(root / CATALOG_NAME)
    files = sorted(FileStore(root).owned_files(AREAS + LEGACY_AREAS))
    report.files = len(files)
    referenced: set[str] = set()
    if report.catalog == "ok":
        try:
            referenced = _check_rows(root, report)
        except sqlite3.Error as exc:
            report.catalog, report.catalog_detail = "unreadable", str(exc)
    orphans = [f for f in files if f not in referenced]
    report.issues += [FsckIssue("orphan", None, f, "no catalog row references this file") for f in orphans]
    if repair:
        if report.catalog != "ok":
            _rebuild(root, report, files, profile)
        elif orphans:
            _readd_orphans(root, report, orphans)
    return report


# == repairing =========================================================================================================
@dataclass
class _Recovered:
    rel: str
    meta: dict[str, Any]
    data: bytes
    cold: bool


def _read_files(root: Path, rels: list[str], report: FsckReport) -> list[_Recovered]:
    from smoa.adapter.safetensors_io import read_adapter_meta
    from smoa.adapter.weights import LoraWeights
    from smoa.storage.files import FileStore

    store = FileStore(root)
    out: list[_Recovered] = []
    for rel in rels:
        try:
            data = store.read(rel, name=rel)
            meta = read_adapter_meta(data, name=rel)
            LoraWeights.from_bytes(data, name=rel)
        except SmoaError as exc:
            report.issues.append(FsckIssue("unrecoverable", None, rel, str(exc).splitlines()[0][:300]))
            continue
        out.append(_Recovered(rel, meta, data, cold=rel.split("/")[-3] == "cold"))
    return out


def _best_per_id(found: list[_Recovered]) -> list[_Recovered]:
    """One file per id: highest ``version``, then hot over cold; files without an id are all kept."""
    best: dict[str, _Recovered] = {}
    anonymous: list[_Recovered] = []
    for r in found:
        aid = r.meta.get("id")
        if not isinstance(aid, str):
            anonymous.append(r)
            continue
        cur = best.get(aid)
        rank = (int(r.meta.get("version") or 0), not r.cold)
        if cur is None or rank > (int(cur.meta.get("version") or 0), not cur.cold):
            best[aid] = r
    return [*best.values(), *anonymous]


def _new_row(r: _Recovered, profile_fp: str) -> Any:
    """A :class:`NewAdapterRow` from a recovered file (header row, or what the tensors say)."""
    from smoa.adapter.granularity import granularity_of
    from smoa.adapter.spec import validate_spec
    from smoa.adapter.weights import LoraWeights, checksum
    from smoa.config import AdapterSpecialization
    from smoa.storage.catalog import NewAdapterRow

    weights = LoraWeights.from_bytes(r.data, name=r.rel)
    m = r.meta
    metadata = dict(m.get("metadata") or {}) if isinstance(m.get("metadata"), dict) else {}
    if not isinstance(m.get("id"), str):
        metadata["recovered_from"] = r.rel
    try:  # the header's texts are checked like any request (a hand-edited header cannot smuggle bad tags in)
        spec = validate_spec({
            "specialization": m.get("specialization", "custom"), "domain_tags": list(m.get("domain_tags") or []),
            "skill_tags": list(m.get("skill_tags") or []), "description": m.get("description") or "",
            "examples": list(m.get("examples") or []), "metadata": metadata, "pinned": bool(m.get("pinned", False)),
        })  # fmt: skip
    except SmoaError:
        spec = validate_spec({"metadata": {"recovered_from": r.rel}})
    aid = m["id"] if isinstance(m.get("id"), str) else "ad_" + secrets.token_hex(8)  # the library's id format
    created = m.get("created_at")
    return NewAdapterRow(
        id=aid, specialization=AdapterSpecialization(spec.specialization).value,
        granularity=granularity_of(weights.num_parameters).value,
        rank=weights.rank, alpha=weights.alpha, description=spec.description, target_modules=list(weights.factors),
        num_parameters=weights.num_parameters, profile=str(m.get("profile") or profile_fp), checksum=checksum(weights.to_bytes()),
        blob=None, file=r.rel, nbytes=len(r.data), created_at=float(created) if isinstance(created, (int, float)) else time.time(),
        domain_tags=list(spec.domain_tags), skill_tags=list(spec.skill_tags), metadata=dict(spec.metadata or {}),
        embedding=None, pinned=spec.pinned, created_query=int(m.get("created_query") or 0), examples=list(spec.examples or []),
    )  # fmt: skip


def _profile_json(rows: list[Any], profile: Any | None) -> str | None:
    from smoa.adapter.profile import resolve_profile

    chosen = profile if profile is not None else resolve_profile(None)
    fps = {r.profile for r in rows}
    if profile is not None or not fps or fps == {chosen.fingerprint}:
        return str(chosen.to_json())
    return None  # rows of another profile: let the core record the profile it is opened with


def _move_aside(root: Path, report: FsckReport) -> None:
    """Move the broken catalog aside, and drop the router's persisted index (derived from the old catalog's keys:
    a rebuilt catalog numbers its rows anew, so the core rebuilds the index from the catalog at the next open)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        src = root / f"{CATALOG_NAME}{suffix}"
        if src.exists():
            dst = root / f"{CATALOG_NAME}.broken-{stamp}{suffix}"
            src.rename(dst)
            report.moved_aside.append(str(dst))
    index = root / INDEX_DIR
    if index.is_dir():
        shutil.rmtree(index, ignore_errors=True)


def _insert(root: Path, rows: list[Any], statuses: dict[str, str], profile: Any | None) -> None:
    from smoa.storage.catalog import Catalog

    catalog = Catalog(root / CATALOG_NAME)
    try:
        if catalog.get_meta("profile") is None and (pj := _profile_json(rows, profile)) is not None:
            catalog.set_meta("profile", pj)
        if catalog.get_meta("encoder") is None:  # keys unknown: the core re-encodes them all at the next open
            catalog.set_meta("encoder", UNKNOWN_ENCODER)
            catalog.set_meta("encoder_dim", "0")
        if not rows:
            return
        keys = catalog.insert_many(rows)
        archived = [k for k, r in zip(keys, rows, strict=True) if statuses.get(r.id) == "archived"]
        if archived:
            with catalog.transaction(bump=True) as db:
                db.executemany("UPDATE adapters SET status = 'archived' WHERE key = ?", [(k,) for k in archived])
    finally:
        catalog.close()


def _rebuild(root: Path, report: FsckReport, files: list[str], profile: Any | None) -> None:
    """A fresh catalog from the weight files (the broken one moved aside first)."""
    from smoa.adapter.profile import resolve_profile

    found = _best_per_id(_read_files(root, files, report))
    fp = (profile if profile is not None else resolve_profile(None)).fingerprint
    rows = [_new_row(r, fp) for r in found]
    statuses = {row.id: ("archived" if r.cold else "active") for row, r in zip(rows, found, strict=True)}
    _move_aside(root, report)
    _insert(root, rows, statuses, profile)
    report.repaired, report.rebuilt_rows = True, len(rows)


def _readd_orphans(root: Path, report: FsckReport, orphans: list[str]) -> None:
    """Orphan files whose header names an id the (readable) catalog lacks come back as rows."""
    db = sqlite3.connect(f"file:{root / CATALOG_NAME}?mode=ro", uri=True)
    try:
        known = {r[0] for r in db.execute("SELECT id FROM adapters")}
        profile_row = db.execute("SELECT value FROM meta WHERE key = 'profile'").fetchone()
    finally:
        db.close()
    found = [r for r in _best_per_id(_read_files(root, orphans, report)) if isinstance(r.meta.get("id"), str)]
    found = [r for r in found if r.meta["id"] not in known]
    if not found:
        return
    from smoa.adapter.profile import BaseProfile, resolve_profile

    fp = (BaseProfile.from_json(profile_row[0]) if profile_row else resolve_profile(None)).fingerprint
    rows = [_new_row(r, fp) for r in found]
    statuses = {row.id: ("archived" if r.cold else "active") for row, r in zip(rows, found, strict=True)}
    _insert(root, rows, statuses, None)
    report.repaired, report.rebuilt_rows = True, len(rows)


def report_json(report: FsckReport) -> str:
    """The report as indented JSON (``smoa fsck --json``)."""
    return json.dumps(report.to_dict(), indent=2, default=str)


__all__ = ["FsckIssue", "FsckReport", "fsck", "holds_library", "report_json"]
