"""``smoa migrate SRC DST``: copy a library between storage backends, resumably.

SRC and DST are ``storage_path`` values — a library directory (SQLite catalog) or a ``postgresql://`` URL — and
each side's weights are where its ``weights_path`` says: ``--src-weights`` / ``--dst-weights`` (``s3://bucket/
prefix``), by default the directory's ``weights/`` (for PostgreSQL: ``bytea`` rows of its ``blobs`` table). So
every pair is covered: SQLite <-> PostgreSQL, local files <-> S3, or both at once.

How the copy stays correct when it is interrupted (Ctrl-C, SIGKILL, a server restart)::

    for each batch of adapter keys, in key order:
        read the batch's rows (adapters, tags, weights, members) from SRC
        copy each weight file the rows name: read, check its sha256 against its name, write to DST's store
        ONE DST transaction: insert the rows  +  meta 'migration_last_key' = the batch's last key
    ONE DST transaction: aliases, merges, meta (profile, encoder, ...), generation, the change log;
                         the marker becomes 'done'

Weight files are written before the rows naming them commit (the library's own rule), so a crash leaves at worst
unreferenced files, which the next run rewrites (idempotent) and the library's orphan sweep collects. Running
the same command again resumes after the last committed batch; running it on a finished copy does nothing. The
rows are copied column for column (keys, versions, checksums, usage statistics included), so SQLite -> PostgreSQL
+ S3 -> SQLite gives the same tables and the same weight bytes, bit for bit; ``--verify`` checks that at the end.
Stop writers on SRC while it runs: the copy reads SRC in batches, not in one snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoa.errors import CorruptAdapterError, InvalidInputError, StorageError
from smoa.storage.base import url_scheme

KEYED_TABLES = (("adapters", "key"), ("tags", "key"), ("weights", "key"), ("members", "composite"))
SMALL_TABLES = ("aliases", "merges")
_META_SKIP = frozenset({"schema_version", "generation", "changes_floor", "migration_source", "migration_last_key",
                        "migration_done"})  # fmt: skip
_PG_SCHEMES = ("postgresql", "postgres")
MAX_LOG_COPY = 1_000_000  # change-log rows copied as they are; past this the copy's log starts at its generation


@dataclass
class MigrationReport:
    """What one ``migrate`` call did."""

    source: str
    destination: str
    adapters_copied: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    resumed_after_key: int = 0
    already_complete: bool = False
    verified: bool | None = None
    differences: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "already complete" if self.already_complete else f"{self.adapters_copied:,} adapters"
        resumed = f", resumed after key {self.resumed_after_key}" if self.resumed_after_key else ""
        verified = "" if self.verified is None else ("; verified equal" if self.verified else "; DIFFERENCES FOUND")
        return (f"{self.source} -> {self.destination}: {state}, {self.files_copied:,} weight files "
                f"({self.bytes_copied:,} bytes){resumed}{verified}")  # fmt: skip


@dataclass
class Endpoint:
    """One side of a migration: its catalog, its weight store (None = weights inline only), and a lock."""

    label: str
    catalog: Any
    store: Any
    lock: Any = None

    def close(self) -> None:
        for part in (self.store, self.catalog):
            if part is not None:
                with contextlib.suppress(Exception):  # closing a dead connection/pool must not fail
                    part.close()
        if self.lock is not None:
            self.lock.release()


def open_endpoint(location: str, weights: str | None, *, create: bool) -> Endpoint:
    """Open a catalog (directory or PostgreSQL URL) and its weight store for migration."""
    from smoa.storage.files import DirectoryLock, FileStore

    scheme = url_scheme(location)
    store: Any = None
    if weights is not None:
        from smoa.storage.base import open_weight_backend

        store = open_weight_backend(weights, None)
    if scheme in _PG_SCHEMES or (scheme or "").startswith("postgresql+"):
        from smoa.storage.postgres import PostgresBlobStore, PostgresCatalog, redact

        catalog = PostgresCatalog(location, listen=False)
        try:  # no object store named: weight files are bytea rows of the same database, as the library keeps them
            store = store if store is not None else PostgresBlobStore(catalog)
        except BaseException:
            catalog.close()
            raise
        return Endpoint(redact(str(location)), catalog, store)
    if scheme is not None:
        raise InvalidInputError(f"`{location}`: a library is a directory or a postgresql:// URL")
    directory = Path(location).expanduser().resolve()
    if not create and not (directory / "catalog.sqlite3").is_file():
        raise InvalidInputError(f"`SRC`={str(directory)!r} holds no library (no catalog.sqlite3)")
    directory.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(directory)
    lock.acquire()  # no library process may write while we copy
    try:
        from smoa.storage.catalog import Catalog

        catalog = Catalog(directory / "catalog.sqlite3")
    except BaseException:
        lock.release()
        raise
    return Endpoint(str(directory), catalog, store if store is not None else FileStore(directory), lock)


def columns(catalog: Any, table: str) -> list[str]:
    """Column names of ``table`` in storage order, on either backend."""
    from smoa.storage.postgres import PostgresCatalog

    if isinstance(catalog, PostgresCatalog):
        rows = catalog._read("SELECT column_name FROM information_schema.columns WHERE table_name = ? AND"
                             " table_schema = current_schema() ORDER BY ordinal_position", (table,))  # fmt: skip
        return [str(r[0]) for r in rows]
    return [str(r[1]) for r in catalog._read(f"PRAGMA table_info({table})")]


def migrate(
    src: str,
    dst: str,
    *,
    src_weights: str | None = None,
    dst_weights: str | None = None,
    batch: int = 2_000,
    verify: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Copy the library at ``src`` into ``dst`` (empty, or a copy this function left unfinished).

    Args:
        src, dst: ``storage_path`` values (directory or ``postgresql://`` URL).
        src_weights, dst_weights: ``weights_path`` values (``s3://bucket/prefix``) or None for the default.
        batch: adapters per destination transaction.
        verify: compare every table and every weight file of both sides at the end.
        on_batch: called ``(adapters copied so far, total)`` after each committed batch.
    """
    if batch < 1:
        raise InvalidInputError(f"`batch` must be >= 1, got {batch!r}")
    source = open_endpoint(str(src), src_weights, create=False)
    try:
        dest = open_endpoint(str(dst), dst_weights, create=True)
    except BaseException:
        source.close()
        raise
    try:
        return _migrate(source, dest, batch, verify, on_batch)
    finally:
        dest.close()
        source.close()


def _migrate(source: Endpoint, dest: Endpoint, batch: int, verify: bool,
             on_batch: Callable[[int, int], None] | None) -> MigrationReport:  # fmt: skip
    report = MigrationReport(source.label, dest.label)
    origin = source.label + (f" + {source.store.url}" if getattr(source.store, "url", None) else "")
    start_key = _resume_point(dest, origin, report)
    if report.already_complete:
        if verify:
            report.differences = compare(source, dest)
            report.verified = not report.differences
        return report
    cols = {t: columns(source.catalog, t) for t, _ in KEYED_TABLES}
    dst_cols = {t: set(columns(dest.catalog, t)) for t, _ in KEYED_TABLES}
    for table, names in cols.items():
        missing = [c for c in names if c not in dst_cols[table]]
        if missing:
            raise StorageError(f"destination table {table!r} lacks columns {missing} (older smoa schema?)")
    total = int(source.catalog._read("SELECT COUNT(*) FROM adapters")[0][0])
    done = int(source.catalog._read("SELECT COUNT(*) FROM adapters WHERE key <= ?", (start_key,))[0][0])
    for rows in _batches(source.catalog, cols, start_key, batch):
        _copy_files(source, dest, rows, cols["weights"], report)
        last_key = int(rows["adapters"][-1][0])
        with dest.catalog.transaction() as db:
            for table, _key in KEYED_TABLES:
                names = cols[table]
                marks = ",".join("?" * len(names))
                db.executemany(f"INSERT INTO {table}({', '.join(names)}) VALUES({marks})", rows[table])
            _put_meta(db, "migration_source", origin)
            _put_meta(db, "migration_last_key", str(last_key))
        report.adapters_copied += len(rows["adapters"])
        done += len(rows["adapters"])
        if on_batch is not None:
            on_batch(done, total)
    _finish(source, dest, origin)
    if verify:
        report.differences = compare(source, dest)
        report.verified = not report.differences
    return report


def _resume_point(dest: Endpoint, origin: str, report: MigrationReport) -> int:
    marker = dest.catalog.get_meta("migration_source")
    finished = dest.catalog.get_meta("migration_done")
    if finished is not None:
        if finished != origin:
            raise InvalidInputError(f"`DST`={dest.label!r} is a finished copy of {finished!r}, not of {origin!r}")
        report.already_complete = True
        return 0
    if marker is None:
        if int(dest.catalog._read("SELECT COUNT(*) FROM adapters")[0][0]) > 0:
            raise InvalidInputError(f"`DST`={dest.label!r} already holds a library; migrate into an empty one")
        return 0
    if marker != origin:
        raise InvalidInputError(f"`DST`={dest.label!r} holds an unfinished copy of {marker!r}, not of {origin!r}")
    report.resumed_after_key = int(dest.catalog.get_meta("migration_last_key") or 0)
    return report.resumed_after_key


def _batches(catalog: Any, cols: dict[str, list[str]], after: int, size: int) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """The source's rows in key order, ``size`` adapters at a time (with their tags, weights, members)."""
    last = after
    names = cols["adapters"]
    key_pos = names.index("key")
    while True:
        adapters = catalog._read(f"SELECT {', '.join(names)} FROM adapters WHERE key > ? ORDER BY key LIMIT ?",
                                 (last, size))  # fmt: skip
        if not adapters:
            return
        lo, hi = int(adapters[0][key_pos]), int(adapters[-1][key_pos])
        out: dict[str, list[tuple[Any, ...]]] = {"adapters": [tuple(r) for r in adapters]}
        for table, key in KEYED_TABLES[1:]:
            out[table] = [tuple(r) for r in catalog._read(
                f"SELECT {', '.join(cols[table])} FROM {table} WHERE {key} BETWEEN ? AND ? ORDER BY {key}", (lo, hi))]  # fmt: skip
        yield out
        last = hi


def _copy_files(source: Endpoint, dest: Endpoint, rows: dict[str, list[tuple[Any, ...]]], names: list[str],
                report: MigrationReport) -> None:  # fmt: skip
    """Copy the weight files a batch names into the destination store (or inline them when it has none)."""
    data_i, file_i = names.index("data"), names.index("file")
    fixed = []
    for row in rows["weights"]:
        rel = row[file_i]
        if rel is None:
            fixed.append(row)
            continue
        digest = str(rel).rsplit("/", 1)[-1]
        data = source.store.read(rel, name=f"weights of key {row[0]}") if source.store is not None else None
        if data is None:
            raise StorageError(f"{source.label}: key {row[0]} names weight file {rel!r} but SRC has no weight store")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptAdapterError(f"{source.label}: weight file {rel!r} fails its checksum; fix SRC (smoa fsck) first")
        new = list(row)
        if dest.store is None:
            new[data_i], new[file_i] = data, None
        else:
            area = str(rel).rsplit("/", 2)[0]
            new[file_i] = dest.store.write(area, digest, data)
        fixed.append(tuple(new))
        report.files_copied += 1
        report.bytes_copied += len(data)
    rows["weights"] = fixed


def _put_meta(db: Any, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))


def _finish(source: Endpoint, dest: Endpoint, origin: str) -> None:
    """One transaction: aliases, merges, meta and the generation; the copy is then marked done."""
    small = {t: columns(source.catalog, t) for t in SMALL_TABLES}
    data = {t: source.catalog._read(f"SELECT {', '.join(c)} FROM {t}") for t, c in small.items()}
    meta = [(k, v) for k, v in source.catalog._read("SELECT key, value FROM meta") if k not in _META_SKIP]
    generation = str(source.catalog.get_meta("generation") or "0")
    log_rows = int(source.catalog._read("SELECT COUNT(*) FROM changes")[0][0])
    log = ([tuple(r) for r in source.catalog._read("SELECT generation, key FROM changes ORDER BY generation, key")]
           if log_rows <= MAX_LOG_COPY else None)  # fmt: skip  # a longer log is cut: readers behind it rebuild
    with dest.catalog.transaction() as db:
        for table, names in small.items():
            db.execute(f"DELETE FROM {table}")
            db.executemany(f"INSERT INTO {table}({', '.join(names)}) VALUES({','.join('?' * len(names))})",
                           [tuple(r) for r in data[table]])  # fmt: skip
        for key, value in meta:
            _put_meta(db, key, value)
        db.execute("DELETE FROM changes")  # the inserts above logged themselves; the source's log replaces that
        if log is not None:
            db.executemany("INSERT INTO changes(generation, key) VALUES(?, ?)", log)
        floor = str(source.catalog.get_meta("changes_floor") or "0") if log is not None else generation
        for key, value in (("generation", generation), ("changes_floor", floor), ("migration_done", origin)):
            _put_meta(db, key, value)
        db.execute("DELETE FROM meta WHERE key IN ('migration_source', 'migration_last_key')")
    from smoa.storage.postgres import PostgresCatalog

    if isinstance(dest.catalog, PostgresCatalog):  # the merges id sequence continues after the copied ids
        dest.catalog._read("SELECT setval(pg_get_serial_sequence('merges', 'merge_id'),"
                           " COALESCE((SELECT MAX(merge_id) FROM merges), 0) + 1, false)")  # fmt: skip
    dest.catalog.generation = int(generation)


def table_digest(catalog: Any, table: str, names: list[str], order: str) -> tuple[int, str]:
    """``(rows, sha256)`` of a table's rows in ``order``, canonically encoded (same on both backends)."""
    h = hashlib.sha256()
    n = 0
    for row in catalog._read(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}"):
        h.update(json.dumps([v.hex() if isinstance(v, (bytes, memoryview)) else v for v in
                             (bytes(x) if isinstance(x, memoryview) else x for x in row)]).encode())  # fmt: skip
        n += 1
    return n, h.hexdigest()


_ORDER = {"adapters": "key", "tags": "key, kind, position", "weights": "key", "members": "composite, position",
          "aliases": "alias", "merges": "merge_id"}  # fmt: skip


def compare(a: Endpoint, b: Endpoint) -> list[str]:
    """Differences between two libraries: every table (rows, bit for bit; the weights table compared by content,
    not by where it lives) and the meta that describes the library."""
    diffs: list[str] = []
    for table, order in _ORDER.items():
        names = [c for c in columns(a.catalog, table) if not (table == "weights" and c in ("data", "file"))]
        da, db_ = table_digest(a.catalog, table, names, order), table_digest(b.catalog, table, names, order)
        if da != db_:
            diffs.append(f"table {table}: {da[0]} rows {da[1][:12]} vs {db_[0]} rows {db_[1][:12]}")
    wa, wb = dict(_weight_digests(a)), dict(_weight_digests(b))
    if wa != wb:
        bad = sorted(k for k in set(wa) | set(wb) if wa.get(k) != wb.get(k))
        diffs.append(f"weights differ for {len(bad)} adapter keys (first: {bad[:5]})")
    ma = {k: v for k, v in a.catalog._read("SELECT key, value FROM meta") if k not in _META_SKIP}
    mb = {k: v for k, v in b.catalog._read("SELECT key, value FROM meta") if k not in _META_SKIP}
    if ma != mb:
        diffs.append(f"meta differs: {sorted(set(ma.items()) ^ set(mb.items()))[:5]}")
    return diffs


def _weight_digests(end: Endpoint) -> Iterator[tuple[int, str]]:
    """``(key, sha256 of the weight bytes)`` of every adapter, whether inline or in a file/object."""
    last = 0
    while rows := end.catalog._read("SELECT key, data, file FROM weights WHERE key > ? ORDER BY key LIMIT 500", (last,)):
        for key, data, rel in rows:
            if data is None and rel is not None:
                data = end.store.read(rel, name=f"key {key}") if end.store is not None else b""
            yield int(key), hashlib.sha256(bytes(data or b"")).hexdigest()
        last = int(rows[-1][0])


def add_arguments(p: Any) -> None:
    """The ``smoa migrate`` arguments (shared by ``smoa`` and ``python -m smoa.storage.migrate``)."""
    p.add_argument("src", metavar="SRC", help="library to copy: a directory or a postgresql:// URL")
    p.add_argument("dst", metavar="DST", help="where to copy it: an empty directory/database, or an unfinished copy")
    p.add_argument("--src-weights", default=None, metavar="URL", help="SRC's weights_path (s3://bucket/prefix)")
    p.add_argument("--dst-weights", default=None, metavar="URL", help="DST's weights_path (s3://bucket/prefix)")
    p.add_argument("--batch", type=int, default=2_000, help="adapters per destination transaction (default 2000)")
    p.add_argument("--verify", action="store_true", help="compare every table and weight file at the end")
    p.add_argument("--progress", action="store_true", help="print a line after each committed batch")


def run(args: Any) -> int:
    """Run one migration from parsed arguments; prints the report; exit status 1 when verification failed."""
    def progress(done: int, total: int) -> None:
        print(f"copied {done:,}/{total:,} adapters", flush=True)

    report = migrate(args.src, args.dst, src_weights=args.src_weights, dst_weights=args.dst_weights,
                     batch=args.batch, verify=args.verify, on_batch=progress if args.progress else None)  # fmt: skip
    print(report)
    for line in report.differences:
        print("  " + line)
    return 0 if report.verified is not False else 1


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from smoa.errors import SmoaError

    parser = argparse.ArgumentParser(prog="smoa migrate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SmoaError as exc:
        print(f"smoa migrate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
