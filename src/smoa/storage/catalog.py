"""The catalog: one SQLite database (WAL mode) holding adapter metadata, tags, routing keys and weights.

Layout of a library directory::

    <storage_path>/
      catalog.sqlite3        adapters, tags, weights (inline safetensors BLOBs), members, aliases, merges, meta
      weights/hot/ab/<sha256>   content-addressed safetensors files of adapters larger than `blob_inline_max_bytes`
      weights/cold/ab/<sha256>  weights of archived and merged-away adapters (restorable)
      (blobs/, cold/: the same for libraries made before schema 2; read, never swept)
      index/                 the router's persisted indexes (owned by smoa.routing)
      LOCK                   held (flock) by the one process that has the library open

One adapter = one transaction: its row, tags and weights commit together or not at all. File blobs are written
(temp file, fsync, rename) *before* the rows that reference them commit and unlinked only *after* the rows that
referenced them are gone; files no row references (a crash between the two steps) are collected at open — only
inside ``weights/``, only names that are sha256 digests: the library never deletes a file it did not write.

Every write transaction that changes what routing or mixing sees bumps ``generation`` in ``meta``, and triggers
append ``(generation, key)`` to the ``changes`` table for every adapter row (or its members) touched (a tag
change touches its adapter's row too) —
even by a write that did not go through :class:`smoa.core.LibraryCore` — so a router that is behind catches up
from :meth:`Catalog.changes_since` instead of rebuilding. Key 0 in the log means "the alias table changed".
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoa.adapter.spec import Adapter
from smoa.config import AdapterGranularity, AdapterSpecialization
from smoa.errors import AdapterNotFoundError, InvalidInputError, StorageError
from smoa.storage.base import DirectoryRow, RoutingRow

SCHEMA_VERSION = 2
RECOVER_HINT = "run `smoa fsck {path} --repair` to rebuild the catalog from the weight files"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters(
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    specialization TEXT NOT NULL,
    granularity TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    target_modules TEXT NOT NULL,
    num_parameters INTEGER NOT NULL,
    profile TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    checksum TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL,
    usage_count INTEGER NOT NULL DEFAULT 0,
    last_used_query INTEGER NOT NULL DEFAULT 0,
    created_query INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active',
    metadata TEXT NOT NULL DEFAULT '{}',
    embedding BLOB,
    examples TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS adapters_by_status ON adapters(status);
CREATE TABLE IF NOT EXISTS tags(
    key INTEGER NOT NULL,
    kind INTEGER NOT NULL,          -- 0 domain, 1 skill
    position INTEGER NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY(key, kind, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS weights(
    key INTEGER PRIMARY KEY,
    data BLOB,                      -- inline safetensors bytes, or NULL when in a file
    file TEXT                       -- relative path of a content-addressed file (blobs/.. or cold/..)
);
CREATE TABLE IF NOT EXISTS members(
    composite INTEGER NOT NULL,
    position INTEGER NOT NULL,
    member_id TEXT NOT NULL,
    weight REAL NOT NULL,
    PRIMARY KEY(composite, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_member ON members(member_id);
CREATE TABLE IF NOT EXISTS aliases(alias TEXT PRIMARY KEY, target TEXT NOT NULL, merge_id INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS merges(
    merge_id INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    merged_into TEXT NOT NULL,
    sources TEXT NOT NULL,          -- JSON list of source ids
    method TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
"""

_NEXT_GEN = "(SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = 'generation')"
_LOG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS changes(generation INTEGER NOT NULL, key INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS changes_by_generation ON changes(generation);
CREATE TRIGGER IF NOT EXISTS log_adapter_insert AFTER INSERT ON adapters
    BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, NEW.key); END;
CREATE TRIGGER IF NOT EXISTS log_adapter_delete AFTER DELETE ON adapters
    BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, OLD.key); END;
CREATE TRIGGER IF NOT EXISTS log_adapter_update_v2 AFTER UPDATE OF status, version, embedding, description, examples,
    pinned ON adapters BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, NEW.key); END;
CREATE TRIGGER IF NOT EXISTS log_members_insert AFTER INSERT ON members
    BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, NEW.composite); END;
CREATE TRIGGER IF NOT EXISTS log_members_delete AFTER DELETE ON members
    BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, OLD.composite); END;
CREATE TRIGGER IF NOT EXISTS log_alias_insert AFTER INSERT ON aliases BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, 0); END;
CREATE TRIGGER IF NOT EXISTS log_alias_delete AFTER DELETE ON aliases BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, 0); END;
CREATE TRIGGER IF NOT EXISTS log_alias_update AFTER UPDATE ON aliases BEGIN INSERT INTO changes VALUES({_NEXT_GEN}, 0); END;
"""

_COLUMNS = (
    "key, id, specialization, granularity, rank, alpha, description, target_modules, num_parameters, profile, "
    "version, checksum, nbytes, created_at, last_used_at, usage_count, pinned, status, metadata, last_used_query, "
    "created_query, examples"
)


@dataclass
class NewAdapterRow:
    """Everything stored for one new adapter (built by the library, written by :meth:`Catalog.insert_many`)."""

    id: str
    specialization: str
    granularity: str
    rank: int
    alpha: float
    description: str
    target_modules: list[str]
    num_parameters: int
    profile: str
    checksum: str
    blob: bytes | None  # inline weights, or None when `file` is set
    file: str | None
    nbytes: int
    created_at: float
    domain_tags: list[str]
    skill_tags: list[str]
    metadata: dict[str, Any]
    embedding: bytes | None
    pinned: bool = False
    members: list[tuple[str, float]] | None = None
    created_query: int = 0
    examples: list[str] | None = None


class Catalog:
    """Typed access to ``catalog.sqlite3``. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        hint = RECOVER_HINT.format(path=str(path.parent))
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open catalog {str(path)!r}: {exc}; {hint}") from exc
        try:
            self._open(path, hint)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, hint: str) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.execute("PRAGMA foreign_keys=OFF")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StorageError(f"catalog {str(path)!r} failed its integrity check: {check}; {hint}")
            self._db.executescript(_SCHEMA)
            self._migrate()
            for old in ("log_adapter_update", "log_tags_insert", "log_tags_delete"):  # replaced / not needed
                self._db.execute(f"DROP TRIGGER IF EXISTS {old}")
            self._db.executescript(_LOG_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open catalog {str(path)!r}: {exc}; {hint}") from exc
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES('generation', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES('queries', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES('changes_floor', '0')")
        version = int(self.get_meta("schema_version") or 0)
        if version != SCHEMA_VERSION:
            raise StorageError(f"catalog {str(path)!r} has schema version {version}, this smoa reads {SCHEMA_VERSION}")
        self.generation = int(self.get_meta("generation") or 0)

    def _migrate(self) -> None:
        """Schema 1 -> 2: the ``examples`` column and the change log (the log starts at today's generation)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != 1:
            return
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(adapters)")}
        self._db.execute("BEGIN IMMEDIATE")
        if "examples" not in cols:
            self._db.execute("ALTER TABLE adapters ADD COLUMN examples TEXT NOT NULL DEFAULT '[]'")
        self._db.execute("INSERT OR REPLACE INTO meta SELECT 'changes_floor', value FROM meta WHERE key = 'generation'")
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        self._db.execute("COMMIT")

    # -- transactions ------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self, bump: bool = False) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls back. ``bump`` advances the generation."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"catalog {str(self.path)!r} is busy or unwritable: {exc}") from exc
            try:
                yield self._db
                if bump:
                    self._db.execute(
                        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'generation'"
                    )
                self._db.execute("COMMIT")
            except BaseException as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"catalog write failed ({type(exc).__name__}: {exc}); nothing was changed") from exc
                raise
            if bump:
                self.generation += 1

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"catalog read failed ({exc})") from exc

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))

    # -- writes ------------------------------------------------------------------------------------------------
    def insert_many(self, rows: Sequence[NewAdapterRow]) -> list[int]:
        """Insert adapters in one transaction; returns their keys in order."""
        return self.insert_chunks([rows])

    def insert_chunks(self, chunks: Iterable[Sequence[NewAdapterRow]], on_chunk: Any = None) -> list[int]:
        """Insert adapters chunk by chunk (built lazily by the caller) in ONE transaction: all or none.

        ``on_chunk(keys, rows)`` runs after each chunk's statements (inside the transaction), so the caller can
        drop the chunk's bytes before the next one is built — bulk creation streams instead of buffering.
        """
        keys: list[int] = []
        modules_json: dict[int, str] = {}  # rows of one bulk call usually share one module list

        def mods(r: NewAdapterRow) -> str:
            text = modules_json.get(id(r.target_modules))
            if text is None:
                text = modules_json[id(r.target_modules)] = json.dumps(r.target_modules)
            return text

        with self.transaction(bump=True) as db:
            start = db.execute("SELECT COALESCE(MAX(key), 0) FROM adapters").fetchone()[0] + 1
            for rows in chunks:
                ks = list(range(start + len(keys), start + len(keys) + len(rows)))
                self._insert_rows(db, ks, rows, mods)
                keys += ks
                if on_chunk is not None:
                    on_chunk(ks, rows)
        return keys

    @staticmethod
    def _insert_rows(db: sqlite3.Connection, keys: list[int], rows: Sequence[NewAdapterRow], mods: Any) -> None:
        db.executemany(
            "INSERT INTO adapters(key, id, specialization, granularity, rank, alpha, description, target_modules,"
            " num_parameters, profile, checksum, nbytes, created_at, pinned, metadata, embedding, created_query,"
            " examples) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (k, r.id, r.specialization, r.granularity, r.rank, r.alpha, r.description,
                 mods(r), r.num_parameters, r.profile, r.checksum, r.nbytes, r.created_at,
                 int(r.pinned), json.dumps(r.metadata, ensure_ascii=False) if r.metadata else "{}", r.embedding,
                 r.created_query, json.dumps(r.examples, ensure_ascii=False) if r.examples else "[]")
                for k, r in zip(keys, rows)
            ],
        )  # fmt: skip
        db.executemany(
            "INSERT INTO tags VALUES(?,?,?,?)",
            [
                (k, kind, pos, tag)
                for k, r in zip(keys, rows)
                for kind, tags in ((0, r.domain_tags), (1, r.skill_tags))
                for pos, tag in enumerate(tags)
            ],
        )
        db.executemany("INSERT INTO weights VALUES(?,?,?)", [(k, r.blob, r.file) for k, r in zip(keys, rows)])
        db.executemany(
            "INSERT INTO members VALUES(?,?,?,?)",
            [(k, pos, mid, w) for k, r in zip(keys, rows) for pos, (mid, w) in enumerate(r.members or [])],
        )

    def replace_weights(
        self, key: int, blob: bytes | None, file: str | None, checksum: str, nbytes: int, embedding: bytes | None
    ) -> int:
        """New weights for an adapter: bumps its version; returns the new version."""
        with self.transaction(bump=True) as db:
            db.execute("UPDATE weights SET data = ?, file = ? WHERE key = ?", (blob, file, key))
            sets = "version = version + 1, checksum = ?, nbytes = ?"
            params: list[Any] = [checksum, nbytes]
            if embedding is not None:
                sets += ", embedding = ?"
                params.append(embedding)
            db.execute(f"UPDATE adapters SET {sets} WHERE key = ?", (*params, key))
            return int(db.execute("SELECT version FROM adapters WHERE key = ?", (key,)).fetchone()[0])

    def set_embedding(self, key: int, embedding: bytes) -> None:
        with self.transaction(bump=True) as db:
            db.execute("UPDATE adapters SET embedding = ? WHERE key = ?", (embedding, key))

    def delete(self, keys: Sequence[int]) -> list[str]:
        """Delete adapters (rows, tags, weights, members, aliases to/from them) in one transaction; returns files
        no row references any more."""
        with self.transaction(bump=True) as db:
            files = self._delete_rows(db, keys)
            # decided inside the transaction: no read after COMMIT can fail and hide a completed delete
            unused = [f for f in dict.fromkeys(files)
                      if not db.execute("SELECT 1 FROM weights WHERE file = ? LIMIT 1", (f,)).fetchone()]  # fmt: skip
        return unused

    def set_status(self, key: int, status: str, blob: bytes | None = None, file: str | None = None) -> str | None:
        """Change status (active/archived/merged), optionally moving the weights; returns the old file, if any."""
        with self.transaction(bump=True) as db:
            old = db.execute("SELECT file FROM weights WHERE key = ?", (key,)).fetchone()
            db.execute("UPDATE adapters SET status = ? WHERE key = ?", (status, key))
            if blob is not None or file is not None:
                db.execute("UPDATE weights SET data = ?, file = ? WHERE key = ?", (blob, file, key))
        return old[0] if old else None

    def set_pinned(self, key: int, pinned: bool) -> None:
        with self.transaction(bump=True) as db:  # the core's directory holds `pinned` (prune skips pinned)
            db.execute("UPDATE adapters SET pinned = ? WHERE key = ?", (int(pinned), key))

    def add_tags(self, key: int, domain_tags: Sequence[str], skill_tags: Sequence[str]) -> None:
        with self.transaction(bump=True) as db:
            for kind, tags in ((0, domain_tags), (1, skill_tags)):
                start = db.execute(
                    "SELECT COALESCE(MAX(position) + 1, 0) FROM tags WHERE key = ? AND kind = ?", (key, kind)
                ).fetchone()[0]
                db.executemany("INSERT INTO tags VALUES(?,?,?,?)", [(key, kind, start + i, t) for i, t in enumerate(tags)])

    def record_usage(
        self, counts: dict[int, int], last_used: dict[int, tuple[float, int]], query_counter: int
    ) -> None:
        """Flush batched usage statistics (one transaction, no generation bump: routing is unaffected).

        ``last_used`` maps a key to ``(time, library query counter)`` at its latest use.
        """
        with self.transaction() as db:
            db.executemany(
                "UPDATE adapters SET usage_count = usage_count + ?, last_used_at = ?, last_used_query = ? WHERE key = ?",
                [(n, last_used[k][0], last_used[k][1], k) for k, n in counts.items()],
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'queries'", (str(query_counter),))

    def record_merge(self, moves: Sequence[tuple[int, str, str]], merged_id: str, method: str) -> int:
        """One transaction: sources ``(key, id, cold file)`` become ``merged`` (weights in cold storage, kept
        for undo), each id an alias of ``merged_id`` (aliases that pointed at a source follow it), one
        ``merges`` row. Returns the merge id."""
        with self.transaction(bump=True) as db:
            cur = db.execute(
                "INSERT INTO merges(created_at, merged_into, sources, method) VALUES(?,?,?,?)",
                (time.time(), merged_id, json.dumps([m[1] for m in moves]), method),
            )
            merge_id = int(cur.lastrowid or 0)
            for key, source_id, cold in moves:
                if db.execute("UPDATE weights SET data = NULL, file = ? WHERE key = ?", (cold, key)).rowcount != 1:
                    # deleted by a concurrent writer since the caller read it: roll the whole merge back
                    raise AdapterNotFoundError(f"no adapter with id {source_id!r} (deleted during the merge)")
                db.execute("UPDATE adapters SET status = 'merged' WHERE key = ?", (key,))
                db.execute("UPDATE aliases SET target = ? WHERE target = ?", (merged_id, source_id))
                db.execute("INSERT OR REPLACE INTO aliases VALUES(?,?,?)", (source_id, merged_id, merge_id))
        return merge_id

    def merge_info(self, merge_id: int) -> tuple[str, list[str], bool] | None:
        """``(merged_into, source ids, undone)`` of a merge record, or None."""
        rows = self._read("SELECT merged_into, sources, undone FROM merges WHERE merge_id = ?", (int(merge_id),))
        return (str(rows[0][0]), list(json.loads(rows[0][1])), bool(rows[0][2])) if rows else None

    def undo_merge(
        self, merge_id: int, restores: Sequence[tuple[int, bytes | None, str | None]], delete_key: int | None
    ) -> tuple[list[str], str, list[str]]:
        """Inverse of :meth:`record_merge`, in one transaction: the sources in ``restores`` ``(key, blob, file)``
        become ``active`` with those weights, the merge's aliases go, the record is marked undone and the merged
        adapter (``delete_key``) is deleted. Returns ``(restored ids, merged id, files no row references now)``."""
        with self.transaction(bump=True) as db:
            row = db.execute("SELECT merged_into, undone FROM merges WHERE merge_id = ?", (merge_id,)).fetchone()
            if row is None or row[1]:
                raise InvalidInputError(f"`merge_id`={merge_id!r} is not a merge that can be undone (unknown or undone)")
            old_files = [r[0] for k, _, _ in restores for r in db.execute("SELECT file FROM weights WHERE key = ?", (k,)) if r[0]]
            restored = []
            for key, blob, file in restores:
                if db.execute("UPDATE adapters SET status = 'active' WHERE key = ? AND status = 'merged'", (key,)).rowcount != 1:
                    raise InvalidInputError(f"`merge_id`={merge_id!r}: a source changed during the undo; nothing was changed")
                db.execute("UPDATE weights SET data = ?, file = ? WHERE key = ?", (blob, file, key))
                restored.append(str(db.execute("SELECT id FROM adapters WHERE key = ?", (key,)).fetchone()[0]))
            db.execute("DELETE FROM aliases WHERE merge_id = ?", (merge_id,))
            db.execute("UPDATE merges SET undone = 1 WHERE merge_id = ?", (merge_id,))
            if delete_key is not None:
                old_files += self._delete_rows(db, [delete_key])
            unused = [f for f in old_files if not db.execute("SELECT 1 FROM weights WHERE file = ? LIMIT 1", (f,)).fetchone()]
        return restored, str(row[0]), unused

    def delete_alias(self, alias: str) -> list[str]:
        """Forget a merged-away id: its alias and its retained pre-merge copy (row + cold weights) go; the adapter
        it was merged into and every other source stay. Returns files no row references now."""
        with self.transaction(bump=True) as db:
            db.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            row = db.execute("SELECT key FROM adapters WHERE id = ? AND status = 'merged'", (alias,)).fetchone()
            files = self._delete_rows(db, [int(row[0])]) if row else []
            unused = [f for f in files if not db.execute("SELECT 1 FROM weights WHERE file = ? LIMIT 1", (f,)).fetchone()]
        return unused

    def set_embeddings(self, items: Sequence[tuple[int, bytes | None]]) -> None:
        """New routing keys (float32 ``[P, dim]`` bytes, or None) for many adapters in one transaction."""
        with self.transaction(bump=True) as db:
            db.executemany("UPDATE adapters SET embedding = ? WHERE key = ?", [(e, int(k)) for k, e in items])

    def update_fields(
        self, key: int, *, domain_tags: Sequence[str] | None = None, skill_tags: Sequence[str] | None = None,
        description: str | None = None, examples: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None, embedding: bytes | None = None,
    ) -> None:  # fmt: skip
        """Replace an adapter's routing texts / metadata (only the fields given) and its key, in one transaction."""
        with self.transaction(bump=True) as db:
            if db.execute("SELECT 1 FROM adapters WHERE key = ?", (key,)).fetchone() is None:
                raise AdapterNotFoundError(f"no adapter with key {key}")
            for kind, tags in ((0, domain_tags), (1, skill_tags)):
                if tags is not None:
                    db.execute("DELETE FROM tags WHERE key = ? AND kind = ?", (key, kind))
                    db.executemany("INSERT INTO tags VALUES(?,?,?,?)", [(key, kind, i, t) for i, t in enumerate(tags)])
                    db.execute("UPDATE adapters SET examples = examples WHERE key = ?", (key,))  # logs the change
            if description is not None:
                db.execute("UPDATE adapters SET description = ? WHERE key = ?", (description, key))
            if examples is not None:
                db.execute("UPDATE adapters SET examples = ? WHERE key = ?", (json.dumps(list(examples), ensure_ascii=False), key))
            if metadata is not None:
                db.execute("UPDATE adapters SET metadata = ? WHERE key = ?", (json.dumps(metadata, ensure_ascii=False), key))
            if embedding is not None:
                db.execute("UPDATE adapters SET embedding = ? WHERE key = ?", (embedding, key))

    def compact(self) -> int:
        """Reclaim the space of deleted rows (checkpoint + VACUUM); returns the bytes the database shrank by."""
        def size() -> int:
            return sum(p.stat().st_size for p in (self.path, Path(str(self.path) + "-wal")) if p.exists())

        with self._lock:
            before = size()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("VACUUM")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise StorageError(f"catalog compaction failed ({exc}); nothing was changed") from exc
            return max(0, before - size())

    def trim_changes(self, upto: int) -> None:
        """Drop change-log rows of generations ``<= upto`` (no reader needs them any more)."""
        with self.transaction() as db:
            db.execute("DELETE FROM changes WHERE generation <= ?", (int(upto),))
            db.execute("UPDATE meta SET value = ? WHERE key = 'changes_floor' AND CAST(value AS INTEGER) < ?",
                       (str(int(upto)), int(upto)))  # fmt: skip

    def changes_since(self, generation: int) -> list[int] | None:
        """Keys changed in generations after ``generation`` (0 = the alias table), or None when the log has been
        trimmed past it (the caller then rebuilds)."""
        floor = int(self.get_meta("changes_floor") or 0)
        if generation < floor:
            return None
        return [int(r[0]) for r in self._read(
            "SELECT DISTINCT key FROM changes WHERE generation > ? ORDER BY key", (int(generation),))]  # fmt: skip

    def read_generation(self) -> int:
        """The committed generation as stored (sees other connections' commits)."""
        self.generation = max(self.generation, int(self.get_meta("generation") or 0))
        return self.generation

    def _delete_rows(self, db: sqlite3.Connection, keys: Sequence[int]) -> list[str]:
        """Inside a transaction: delete adapters' rows, tags, weights, members, aliases; returns their files."""
        ids = [r[0] for k in keys for r in db.execute("SELECT id FROM adapters WHERE key = ?", (k,))]
        # the retained pre-merge copies of sources merged into a deleted adapter go with it (nothing could
        # reach them any more: their aliases point at the deleted adapter)
        extra = [int(r[0]) for i in ids for r in db.execute(
            "SELECT a.key FROM aliases al JOIN adapters a ON a.id = al.alias WHERE al.target = ? AND a.status = 'merged'",
            (i,))]  # fmt: skip
        keys = list(dict.fromkeys([*keys, *extra]))
        ids += [r[0] for k in extra for r in db.execute("SELECT id FROM adapters WHERE key = ?", (k,))]
        params = [(k,) for k in keys]
        files = [r[0] for k in keys for r in db.execute("SELECT file FROM weights WHERE key = ?", (k,)) if r[0]]
        db.executemany("DELETE FROM adapters WHERE key = ?", params)
        db.executemany("DELETE FROM tags WHERE key = ?", params)
        db.executemany("DELETE FROM weights WHERE key = ?", params)
        db.executemany("DELETE FROM members WHERE composite = ?", params)
        db.executemany("DELETE FROM aliases WHERE target = ? OR alias = ?", [(i, i) for i in ids])
        return files

    # -- reads -------------------------------------------------------------------------------------------------
    def count(self, statuses: Sequence[str] = ("active", "archived")) -> int:
        marks = ",".join("?" * len(statuses))
        return int(self._read(f"SELECT COUNT(*) FROM adapters WHERE status IN ({marks})", tuple(statuses))[0][0])

    def key_of(self, adapter_id: str) -> int:
        rows = self._read("SELECT key FROM adapters WHERE id = ?", (adapter_id,))
        if not rows:
            raise AdapterNotFoundError(f"no adapter with id {adapter_id!r}")
        return int(rows[0][0])

    def resolve_alias(self, adapter_id: str) -> str | None:
        rows = self._read("SELECT target FROM aliases WHERE alias = ?", (adapter_id,))
        return rows[0][0] if rows else None

    def ids_for_keys(self, keys: Sequence[int]) -> list[str]:
        """Adapter ids for keys (same order); unknown keys give ``""``."""
        with self._lock:
            out = []
            for k in keys:
                row = self._db.execute("SELECT id FROM adapters WHERE key = ?", (int(k),)).fetchone()
                out.append(row[0] if row else "")
            return out

    def get(self, adapter_id: str) -> Adapter:
        rows = self._read(f"SELECT {_COLUMNS} FROM adapters WHERE id = ?", (adapter_id,))
        if not rows:
            raise AdapterNotFoundError(f"no adapter with id {adapter_id!r}")
        return self._to_adapter(rows[0])

    def version_of(self, adapter_id: str) -> tuple[int, int, str]:
        """``(key, version, status)`` of an adapter — the cheap lookup on the weight-load path."""
        rows = self._read("SELECT key, version, status FROM adapters WHERE id = ?", (adapter_id,))
        if not rows:
            raise AdapterNotFoundError(f"no adapter with id {adapter_id!r}")
        key, version, status = rows[0]
        return int(key), int(version), str(status)

    def read_weights(self, key: int) -> tuple[bytes | None, str | None, str, int]:
        """``(inline blob, file, checksum, version)`` of an adapter's stored weights, read in one statement."""
        rows = self._read(
            "SELECT w.data, w.file, a.checksum, a.version FROM weights w JOIN adapters a ON a.key = w.key"
            " WHERE w.key = ?", (key,)
        )  # fmt: skip
        if not rows:
            raise AdapterNotFoundError(f"no weights stored for adapter key {key}")
        return rows[0][0], rows[0][1], rows[0][2], int(rows[0][3])

    def members_of(self, key: int) -> list[tuple[str, float]]:
        return [(m, float(w)) for m, w in self._read(
            "SELECT member_id, weight FROM members WHERE composite = ? ORDER BY position", (key,))]  # fmt: skip

    def composites_containing(self, adapter_id: str) -> list[str]:
        return [r[0] for r in self._read(
            "SELECT a.id FROM members m JOIN adapters a ON a.key = m.composite WHERE m.member_id = ?", (adapter_id,))]  # fmt: skip

    def iter_adapters(self, statuses: Sequence[str] = ("active", "archived"), batch: int = 10_000) -> Iterator[Adapter]:
        """All adapters with these statuses, by key, read in batches (constant memory)."""
        last = 0
        marks = ",".join("?" * len(statuses))
        while True:
            rows = self._read(
                f"SELECT {_COLUMNS} FROM adapters WHERE key > ? AND status IN ({marks}) ORDER BY key LIMIT ?",
                (last, *statuses, batch),
            )
            if not rows:
                return
            for r in rows:
                yield self._to_adapter(r)
            last = rows[-1][0]

    def iter_routing_rows(self, batch: int = 50_000) -> Iterator[tuple[int, bytes | None, list[str], list[str]]]:
        """``(key, embedding bytes, domain_tags, skill_tags)`` of every active adapter, by key."""
        last = 0
        while True:
            rows = self._read(
                "SELECT key, embedding FROM adapters WHERE key > ? AND status = 'active' ORDER BY key LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            lo, hi = rows[0][0], rows[-1][0]
            tags: dict[int, tuple[list[str], list[str]]] = {}
            for key, kind, tag in self._read(
                "SELECT key, kind, tag FROM tags WHERE key BETWEEN ? AND ? ORDER BY key, kind, position", (lo, hi)
            ):
                tags.setdefault(key, ([], []))[kind].append(tag)
            for key, emb in rows:
                d, s = tags.get(key, ([], []))
                yield int(key), emb, d, s
            last = hi

    def routing_row(self, key: int) -> tuple[bytes, list[str], list[str]] | None:
        """``(embedding, domain_tags, skill_tags)`` of an active adapter with a routing key, else None."""
        rows = self._read("SELECT embedding FROM adapters WHERE key = ? AND status = 'active'", (key,))
        if not rows or rows[0][0] is None:
            return None
        d, s = self._tags(key)
        return rows[0][0], d, s

    def all_files(self) -> set[str]:
        return {r[0] for r in self._read("SELECT file FROM weights WHERE file IS NOT NULL")}

    def file_referenced(self, file: str) -> bool:
        return bool(self._read("SELECT 1 FROM weights WHERE file = ? LIMIT 1", (file,)))

    def usage_rows(self) -> Iterator[tuple[str, int, float | None, int, float, bool, str, int]]:
        """``(id, usage_count, last_used_at, last_used_query, created_at, pinned, status, nbytes)`` for all rows."""
        for r in self._read(
            "SELECT id, usage_count, last_used_at, last_used_query, created_at, pinned, status, nbytes FROM adapters"
        ):
            yield r[0], int(r[1]), r[2], int(r[3]), float(r[4]), bool(r[5]), r[6], int(r[7])

    def _tags(self, key: int) -> tuple[list[str], list[str]]:
        out: tuple[list[str], list[str]] = ([], [])
        for kind, tag in self._read("SELECT kind, tag FROM tags WHERE key = ? ORDER BY kind, position", (key,)):
            out[kind].append(tag)
        return out

    def _to_adapter(self, r: tuple[Any, ...]) -> Adapter:
        (key, aid, spec, gran, rank, alpha, desc, mods, nparams, profile, version, checksum, _nbytes, created,
         last_used, usage, pinned, status, meta, last_query, created_query, examples) = r  # fmt: skip
        domain, skill = self._tags(key)
        specialization = AdapterSpecialization(spec)
        members = self.members_of(key) if specialization is AdapterSpecialization.COMPOSITE else []
        return Adapter(
            id=aid, key=int(key), specialization=specialization, granularity=AdapterGranularity(gran),
            rank=int(rank), alpha=float(alpha), domain_tags=domain, skill_tags=skill, description=desc,
            target_modules=json.loads(mods), num_parameters=int(nparams), profile=profile, version=int(version),
            checksum=checksum, created_at=float(created), last_used_at=last_used, usage_count=int(usage),
            pinned=bool(pinned), status=status, members=members, metadata=json.loads(meta),
            last_used_query=int(last_query), created_query=int(created_query), examples=json.loads(examples or "[]"),
        )  # fmt: skip

    def get_by_key(self, key: int) -> Adapter:
        rows = self._read(f"SELECT {_COLUMNS} FROM adapters WHERE key = ?", (int(key),))
        if not rows:
            raise AdapterNotFoundError(f"no adapter with key {key}")
        return self._to_adapter(rows[0])

    def page(self, statuses: Sequence[str], offset: int, limit: int, tag: str | None = None) -> list[Adapter]:
        """Adapters with these statuses by key, ``limit`` from ``offset`` (only those holding ``tag`` if given)."""
        marks = ",".join("?" * len(statuses))
        where = f"status IN ({marks})"
        params: list[Any] = list(statuses)
        if tag is not None:
            where += " AND key IN (SELECT key FROM tags WHERE tag = ?)"
            params.append(tag)
        rows = self._read(f"SELECT {_COLUMNS} FROM adapters WHERE {where} ORDER BY key LIMIT ? OFFSET ?",
                          (*params, int(limit), int(offset)))  # fmt: skip
        return [self._to_adapter(r) for r in rows]

    def directory_rows(self, keys: Sequence[int] | None = None) -> Iterator[DirectoryRow]:
        """``(key, id, version, status, members, pinned)`` of every adapter (or of ``keys``), for the core's
        in-memory directory."""
        if keys is None:
            rows = self._read("SELECT key, id, version, status, pinned, specialization FROM adapters ORDER BY key")
        else:
            ks = [int(k) for k in keys]
            rows = [r for i in range(0, len(ks), 500) for r in self._read(
                "SELECT key, id, version, status, pinned, specialization FROM adapters WHERE key IN"
                f" ({','.join('?' * len(ks[i : i + 500]))}) ORDER BY key", ks[i : i + 500])]  # fmt: skip
        members: dict[int, list[tuple[str, float]]] = {}
        if any(r[5] == AdapterSpecialization.COMPOSITE.value for r in rows):
            for comp, mid, w in self._read("SELECT composite, member_id, weight FROM members ORDER BY composite, position"):
                members.setdefault(int(comp), []).append((str(mid), float(w)))
        for key, aid, version, status, pinned, _spec in rows:
            yield DirectoryRow(int(key), str(aid), int(version), str(status), tuple(members.get(int(key), ())), bool(pinned))

    def aliases(self) -> dict[str, str]:
        return {str(a): str(t) for a, t in self._read("SELECT alias, target FROM aliases")}

    def routing_rows(self, keys: Sequence[int] | None = None, batch: int = 20_000) -> Iterator[RoutingRow]:
        """Routing state (keys + texts) of every adapter, or of ``keys``, read in batches."""
        sel = "SELECT key, status, embedding, description, examples FROM adapters"
        chunks: Iterator[list[tuple[Any, ...]]]
        if keys is None:
            def all_rows() -> Iterator[list[tuple[Any, ...]]]:
                last = 0
                while rows := self._read(f"{sel} WHERE key > ? ORDER BY key LIMIT ?", (last, batch)):
                    yield rows
                    last = rows[-1][0]
            chunks = all_rows()
        else:
            ks = [int(k) for k in keys]
            chunks = (self._read(f"{sel} WHERE key IN ({','.join('?' * len(c))}) ORDER BY key", c)
                      for c in (ks[i : i + 500] for i in range(0, len(ks), 500)))  # fmt: skip
        for rows in chunks:
            if not rows:
                continue
            lo, hi = rows[0][0], rows[-1][0]
            tags: dict[int, tuple[list[str], list[str]]] = {}
            for key, kind, tag in self._read(
                "SELECT key, kind, tag FROM tags WHERE key BETWEEN ? AND ? ORDER BY key, kind, position", (lo, hi)
            ):
                tags.setdefault(key, ([], []))[kind].append(tag)
            for key, status, emb, desc, ex in rows:
                d, s = tags.get(key, ([], []))
                yield RoutingRow(int(key), str(status), emb, d, s, desc, json.loads(ex or "[]"))

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
