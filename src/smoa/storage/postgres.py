"""The catalog on PostgreSQL (psycopg 3): one library shared by several processes and machines.

``SMoAConfig(storage_path="postgresql://user@host:port/db")`` keeps the catalog — adapters, tags, routing keys and
texts, members, aliases, merges, meta, the change log, and small weights inline as ``bytea`` — in one PostgreSQL
database. It is the SQLite catalog (:class:`smoa.storage.catalog.Catalog`, the reference implementation) on
another engine: the same tables and columns (the DDL is derived from SQLite's, types mapped), the same methods
(inherited; their SQL is rewritten once per statement to PostgreSQL's dialect by :func:`to_postgres`), the same
rules:

* **One transaction per mutation.** A write that changes what routing or mixing sees first locks the
  ``generation`` row of ``meta`` (``SELECT ... FOR UPDATE``), so writers from every process serialise there,
  exactly as ``BEGIN IMMEDIATE`` serialises them on SQLite; it bumps the generation and ``NOTIFY``-s it at commit.
* **The change log is a table** ``changes(generation, key)`` filled by triggers translated from the SQLite
  catalog's own at every open (:func:`log_ddl`: statement triggers with transition tables for inserts/deletes,
  row triggers for the routed columns), so even a write that bypasses the core is logged;
  :meth:`changes_since` lets another process's router catch up without a rebuild.
* **Weights without an object store** are ``bytea`` rows of a ``blobs`` table (:class:`PostgresBlobStore`).
* **Other processes' commits** reach this one through ``LISTEN``/``NOTIFY`` on a second connection (a listener
  thread), with a poll of the committed generation every ``poll_interval_s`` (default 1 s) as the safety net
  for notifications lost across a reconnect. The listener raises :attr:`generation`; the core compares it with
  the generation its index reflects on every route (in memory) and, when behind, applies the change log — so
  the hot path reads no SQL until something changed. Documented lag: another process's commit is routed after
  the NOTIFY round trip (milliseconds on one LAN) plus one catch-up, and never later than ``poll_interval_s``
  (+ one reconnect when the server restarted).
* **A restarting or unreachable server.** Reads retry once after reconnecting; a transaction whose ``BEGIN``
  fails reconnects and begins again (nothing was sent yet); a failure inside a transaction rolls back and raises
  :class:`~smoa.errors.StorageError` ("nothing was changed"). A failure *during* ``COMMIT`` is resolved, not
  guessed: after reconnecting, ``txid_status`` of the transaction says whether it committed (then the call
  succeeds) or not (then it raises) — so an acknowledged write is never lost and an error never hides a commit.

The directory lock of the SQLite backend does not exist here: any number of processes open the same library.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from smoa.errors import ConfigError, CorruptAdapterError, StorageError
from smoa.storage import catalog as sqlite_catalog
from smoa.storage.catalog import Catalog

CHANNEL = "smoa_changes"
_SCHEMA_LOCK = 0x534D4F41  # pg_advisory_xact_lock key while creating the schema ("SMOA")
_BUMP_LOCK = "SELECT txid_current(), value FROM meta WHERE key = 'generation' FOR UPDATE"
_BUMP = (f"WITH g AS (UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) WHERE key = 'generation'"
         f" RETURNING value) SELECT value, pg_notify('{CHANNEL}', value) FROM g")  # one round trip: bump + notify
_NEXT_GEN = "(SELECT CAST(value AS BIGINT) + 1 FROM meta WHERE key = 'generation')"

# The change log: the SQLite catalog's triggers (``catalog._LOG_SCHEMA``), translated to PL/pgSQL when the catalog
# opens (:func:`log_ddl`), so a trigger C1 adds or changes there is the same here. SQLite's row triggers on INSERT
# and DELETE become statement triggers with transition tables (a 20,000-row bulk create logs in one statement);
# ``UPDATE OF <columns>`` stays a row trigger (PostgreSQL allows no column list with transition tables).
_SQLITE_TRIGGER = re.compile(
    r"CREATE TRIGGER IF NOT EXISTS (\w+) AFTER (INSERT|DELETE|UPDATE(?: OF ([\w,\s]+?))?)\s+ON (\w+)\s+BEGIN INSERT INTO"
    r" changes VALUES\(\(SELECT CAST\(value AS INTEGER\) \+ 1 FROM meta WHERE key = 'generation'\), "
    r"(?:(NEW|OLD)\.(\w+)|0)\); END;"
)


def log_ddl(sqlite_log_schema: str) -> tuple[str, list[tuple[str, str]]]:
    """PostgreSQL DDL for the SQLite change-log schema; returns ``(ddl, [(trigger, table), ...])``.

    Raises:
        StorageError: a trigger of the SQLite schema has a shape this translation does not know.
    """
    body = re.sub(r"CREATE TRIGGER IF NOT EXISTS.*?END;", "", sqlite_log_schema, flags=re.DOTALL)
    out = [re.sub(r"\bINTEGER\b", "BIGINT", body.strip())]
    names: list[tuple[str, str]] = []
    found = _SQLITE_TRIGGER.findall(sqlite_log_schema)
    if len(found) != sqlite_log_schema.count("CREATE TRIGGER"):
        raise StorageError("the SQLite change-log triggers changed shape; smoa.storage.postgres.log_ddl needs updating")
    for name, event, columns, table, row, column in found:
        fn = f"smoa_{name}"
        kind = event.split()[0]
        if kind == "UPDATE" or not row:  # a row trigger: one log row per changed row (or 0 for the alias table)
            value = f"NEW.{column}" if row == "NEW" else (f"OLD.{column}" if row else "0")
            ret = "RETURN NULL;"
            out.append(f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO"
                       f" changes VALUES({_NEXT_GEN}, {value}); {ret} END $$;")  # fmt: skip
            when = f"UPDATE OF {' '.join(columns.split())}" if columns else kind
            out.append(f"CREATE OR REPLACE TRIGGER {name} AFTER {when} ON {table} FOR EACH ROW EXECUTE FUNCTION {fn}();")
        else:
            rows = "new_rows" if row == "NEW" else "old_rows"
            out.append(f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO"
                       f" changes SELECT {_NEXT_GEN}, {column} FROM {rows}; RETURN NULL; END $$;")  # fmt: skip
            ref = "NEW TABLE AS new_rows" if row == "NEW" else "OLD TABLE AS old_rows"
            out.append(f"CREATE OR REPLACE TRIGGER {name} AFTER {kind} ON {table} REFERENCING {ref} FOR EACH STATEMENT"
                       f" EXECUTE FUNCTION {fn}();")  # fmt: skip
        names.append((name, table))
    return "\n".join(out), names


_EXTRA_INDEXES = """
CREATE INDEX IF NOT EXISTS weights_by_file ON weights(file) WHERE file IS NOT NULL;
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
"""

# Upserts: SQLite's INSERT OR REPLACE names no conflict target; PostgreSQL needs one per table.
_UPSERT = {
    "meta": "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    "aliases": "ON CONFLICT (alias) DO UPDATE SET target = EXCLUDED.target, merge_id = EXCLUDED.merge_id",
    "blobs": "ON CONFLICT (rel) DO UPDATE SET created_at = EXCLUDED.created_at",  # same name = same bytes
}
_RETURNING = {"merges": "merge_id"}  # tables whose INSERT reports `lastrowid`


def schema_ddl(sqlite_schema: str) -> str:
    """PostgreSQL DDL for the SQLite catalog's ``_SCHEMA``: BLOB -> BYTEA, REAL -> DOUBLE PRECISION, INTEGER ->
    BIGINT (a row-id primary key not named ``key`` becomes BIGSERIAL), no ``WITHOUT ROWID``."""
    ddl = re.sub(r"--[^\n]*", "", sqlite_schema)
    ddl = re.sub(r"\b(\w+) INTEGER PRIMARY KEY\b", lambda m: f"{m[1]} {'BIGINT' if m[1] == 'key' else 'BIGSERIAL'} PRIMARY KEY", ddl)
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
    ddl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)
    ddl = re.sub(r"\bBLOB\b", "BYTEA", ddl)
    return re.sub(r"\)\s*WITHOUT ROWID", ")", ddl)


@functools.lru_cache(maxsize=1024)
def to_postgres(sql: str) -> tuple[str, str | None]:
    """Rewrite one SQLite statement of the catalog to PostgreSQL; returns ``(sql, returning column or None)``.

    ``?`` -> ``%s``, ``INSERT OR IGNORE`` -> ``ON CONFLICT DO NOTHING``, ``INSERT OR REPLACE`` -> an upsert on
    the table's key, ``CAST(x AS INTEGER)`` -> ``BIGINT``, and ``RETURNING`` for the inserts whose row id is used.
    """
    out = sql.replace("%", "%%").replace("?", "%s")
    out = re.sub(r"\bAS INTEGER\)", "AS BIGINT)", out)
    returning = None
    m = re.match(r"\s*INSERT OR (IGNORE|REPLACE) INTO (\w+)", out)
    if m:
        out = "INSERT INTO" + out[m.end(1) + len(" INTO") :]
        out += " ON CONFLICT DO NOTHING" if m[1] == "IGNORE" else " " + _UPSERT[m[2]]
    m = re.match(r"\s*INSERT INTO (\w+)", out)
    if m and m[1] in _RETURNING:
        returning = _RETURNING[m[1]]
        out += f" RETURNING {returning}"
    return out, returning


_PLAIN_INSERT = re.compile(r"\s*INSERT INTO (\w+)\s*(\([\w\s,]*\))?\s*VALUES\s*\(\s*\?(\s*,\s*\?)*\s*\)\s*")


@functools.lru_cache(maxsize=256)
def _copy_statement(sql: str) -> str | None:
    """``COPY t(cols) FROM STDIN`` for a plain multi-row insert, else None."""
    m = _PLAIN_INSERT.fullmatch(sql)
    if m is None:
        return None
    return f"COPY {m[1]}{m[2] or ''} FROM STDIN"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigError("`storage_path` postgresql://... needs psycopg 3: pip install 'smoa[distributed]'") from exc
    return psycopg


def normalise_url(url: str) -> str:
    """``postgresql://`` for ``postgres://`` and ``postgresql+psycopg://`` (SQLAlchemy style) URLs."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme.lower().split("+")[0] not in ("postgresql", "postgres"):
        raise ConfigError(f"`storage_path` must be a postgresql:// URL, got {redact(str(url))!r}")
    return "postgresql://" + rest


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class _Cursor:
    """What the inherited SQLite-dialect methods use of a cursor: ``fetchone``/``fetchall``/``rowcount``/
    ``lastrowid``/iteration."""

    def __init__(self, cur: Any, lastrowid: int | None = None) -> None:
        self._cur = cur
        self.lastrowid = lastrowid
        self.rowcount = cur.rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class _Connection:
    """A sqlite3-connection-shaped view of one psycopg connection (``execute``/``executemany``)."""

    def __init__(self, owner: PostgresCatalog) -> None:
        self._owner = owner

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        pg_sql, returning = to_postgres(sql)
        cur = self._owner._live().cursor()
        cur.execute(pg_sql, tuple(params))
        lastrowid = None
        if returning is not None:
            row = cur.fetchone()
            lastrowid = int(row[0]) if row else None
        return _Cursor(cur, lastrowid)

    def executemany(self, sql: str, seq: Any) -> None:
        """Many rows: a plain ``INSERT INTO t[(cols)] VALUES(?, ...)`` becomes one ``COPY t FROM STDIN`` (triggers
        fire as for the inserts: row triggers per row, statement triggers once); anything else is pipelined."""
        rows = [tuple(r) for r in seq]
        if not rows:
            return
        with self._owner._live().cursor() as cur:
            copy = _copy_statement(sql)
            if copy is not None and len(rows) > 1:
                with cur.copy(copy) as out:
                    for row in rows:
                        out.write_row(row)
                return
            cur.executemany(to_postgres(sql)[0], rows)


class PostgresCatalog(Catalog):
    """The catalog in a PostgreSQL database (see the module docstring). Thread-safe: one connection behind a
    lock for this process's reads and writes, plus a listener connection for other processes' commits.

    Args:
        url: ``postgresql://user[:password]@host:port/dbname[?options]``.
        poll_interval_s: the listener's fallback poll of the committed generation.
        reconnect_timeout_s: how long a call waits for an unreachable server before raising StorageError.
        lock_timeout_s: how long a writer waits for another process's write transaction.
        listen: start the listener thread (off for one-shot tools such as ``smoa migrate``).
    """

    def __init__(
        self,
        url: str,
        *,
        poll_interval_s: float = 1.0,
        reconnect_timeout_s: float = 30.0,
        lock_timeout_s: float = 60.0,
        listen: bool = True,
    ) -> None:  # the SQLite constructor is not called: nothing of it applies here
        self.url = normalise_url(url)
        self.path = redact(self.url)  # type: ignore[assignment]  # named in the inherited error messages
        self.poll_interval_s = poll_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self._psycopg = _psycopg()
        self._lock = threading.RLock()
        self._conn: Any = None
        self._db = _Connection(self)  # type: ignore[assignment]
        self._closed = False
        self._in_txn = False
        self._notified = 0
        self._listener_ok_at = 0.0
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self.reconnects = 0
        try:
            self._connect(first=True)
            self._create_schema()
            self.generation = int(self.get_meta("generation") or 0)
            self._notified = self.generation
            if listen:
                self._listener = threading.Thread(target=self._listen, name="smoa-pg-listener", daemon=True)
                self._listener.start()
        except BaseException:
            self.close()
            raise

    # -- connections -------------------------------------------------------------------------------------------
    def _open_connection(self) -> Any:
        conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10, application_name="smoa")
        conn.execute(f"SET lock_timeout = '{int(self.lock_timeout_s * 1000)}ms'")
        return conn

    def _connect(self, first: bool = False) -> None:
        """(Re)open the main connection, retrying for ``reconnect_timeout_s`` (a restarting server)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection/pool must not fail
                self._conn.close()
            self._conn = None
        deadline = time.monotonic() + (min(5.0, self.reconnect_timeout_s) if first else self.reconnect_timeout_s)
        delay = 0.05
        while True:
            try:
                self._conn = self._open_connection()
                if not first:
                    self.reconnects += 1
                return
            except self._psycopg.Error as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"cannot connect to the catalog {self.path!r}: {exc}".strip()) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _is_connection_error(self, exc: BaseException) -> bool:
        ps = self._psycopg
        return isinstance(exc, ps.OperationalError) or (isinstance(exc, ps.Error) and self._conn is not None and self._conn.broken)

    def _create_schema(self) -> None:
        ddl = schema_ddl(sqlite_catalog._SCHEMA)
        version = str(sqlite_catalog.SCHEMA_VERSION)
        with self._lock:
            try:
                with self._conn.transaction():  # concurrent first opens: one creates, the others wait and see it
                    self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    exists = self._conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]
                    if not exists:
                        self._conn.execute(ddl)
                        self._conn.execute(_EXTRA_INDEXES)
                    if exists:  # replacing a trigger locks its table: first queue behind (and hold off) every
                        # writer of other processes at the generation row they all take first, so a reopen while
                        # others write can never deadlock with them table by table
                        self._conn.execute(_BUMP_LOCK)
                    self._sync_triggers()
                    for key, value in (("schema_version", version), ("generation", "0"), ("queries", "0"),
                                       ("changes_floor", "0")):  # fmt: skip
                        self._conn.execute("INSERT INTO meta VALUES(%s, %s) ON CONFLICT DO NOTHING", (key, value))
            except self._psycopg.Error as exc:
                raise StorageError(f"cannot open the catalog {self.path!r}: {exc}") from exc
        stored = self.get_meta("schema_version")
        if stored != version:
            raise StorageError(f"catalog {self.path!r} has schema version {stored}, this smoa reads {version}")

    def _sync_triggers(self) -> None:
        """(Inside the schema transaction) the change-log triggers of this smoa's SQLite schema, and no others."""
        ddl, wanted = log_ddl(sqlite_catalog._LOG_SCHEMA)
        self._conn.execute(ddl)
        have = self._conn.execute(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE NOT t.tgisinternal AND n.nspname = current_schema()"
            " AND t.tgname LIKE 'log\\_%'"
        ).fetchall()  # fmt: skip
        for name, table in set(have) - set(wanted):  # a trigger an older smoa made and this one no longer has
            self._conn.execute(f'DROP TRIGGER IF EXISTS "{name}" ON "{table}"')

    # -- transactions ------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self, bump: bool = False) -> Iterator[Any]:  # type: ignore[override]
        """``BEGIN`` ... ``COMMIT`` on the server; any exception rolls back. ``bump`` serialises with every other
        writer (the generation row lock), advances the generation and notifies the other processes."""
        ps = self._psycopg
        with self._lock:
            self._check_open()
            if self._in_txn:
                raise StorageError("catalog transactions do not nest (a write inside a write)")
            xid = self._begin(bump)
            self._in_txn = True
            try:
                yield self._db
                if bump:
                    new_gen = int(self._conn.execute(_BUMP).fetchone()[0])
            except BaseException as exc:
                self._in_txn = False
                self._rollback()
                if isinstance(exc, ps.Error):
                    if self._is_connection_error(exc):
                        self._drop_connection()
                    raise StorageError(f"catalog write failed ({type(exc).__name__}: {exc}); nothing was changed") from exc
                raise
            self._in_txn = False
            self._commit(xid)
            if bump:
                self._advance(new_gen)

    def _begin(self, bump: bool) -> int | None:
        """BEGIN (reconnecting first if the connection died: nothing was sent yet); returns the txid if bumping."""
        for attempt in (0, 1):
            try:
                if self._conn is None:
                    self._connect()
                self._conn.execute("BEGIN")
                if not bump:
                    return None
                return int(self._conn.execute(_BUMP_LOCK).fetchone()[0])  # waits for any other process's writer
            except self._psycopg.Error as exc:
                self._rollback()
                if attempt == 0 and self._is_connection_error(exc):
                    self._drop_connection()
                    continue
                if isinstance(exc, self._psycopg.errors.LockNotAvailable):
                    raise StorageError(f"catalog {self.path!r} is busy (another writer held it {self.lock_timeout_s}s)") from exc
                raise StorageError(f"catalog {self.path!r} is unreachable or unwritable: {exc}") from exc
        raise AssertionError("unreachable")

    def _commit(self, xid: int | None) -> None:
        try:
            self._conn.execute("COMMIT")
        except self._psycopg.Error as exc:
            self._drop_connection()
            if xid is None:
                raise StorageError(f"catalog commit failed ({exc}); the change may not have been applied") from exc
            status = self._txid_status(xid)
            if status == "committed":
                return
            if status == "aborted":
                raise StorageError(f"catalog commit failed ({exc}); nothing was changed") from exc
            raise StorageError(f"catalog commit failed ({exc}); its outcome is unknown ({status})") from exc

    def _txid_status(self, xid: int) -> str:
        """``committed`` / ``aborted`` / ``in progress`` of a transaction, asked after reconnecting."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        while time.monotonic() < deadline:
            try:
                if self._conn is None:
                    self._connect()
                row = self._conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()
                status = str(row[0]) if row and row[0] is not None else "unknown"
                if status != "in progress":
                    return status
            except (self._psycopg.Error, StorageError):
                self._drop_connection()
            time.sleep(0.1)
        return "unknown"

    def _rollback(self) -> None:
        try:
            if self._conn is not None and not self._conn.broken:
                self._conn.execute("ROLLBACK")
        except self._psycopg.Error:
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection/pool must not fail
                conn.close()

    def _advance(self, new_gen: int) -> None:
        """After our own commit at ``new_gen``. Other processes may have committed in between: the core then
        catches up from the log after the generation its index reflects, which covers their changes too."""
        self.generation = max(self.generation, new_gen)
        self._notified = max(self._notified, new_gen)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            if self._in_txn:  # inside a write: never reconnect (the rest would run outside the transaction)
                return self._db.execute(sql, params).fetchall()
            for attempt in (0, 1):
                try:
                    if self._conn is None:
                        self._connect()
                    return self._db.execute(sql, params).fetchall()
                except self._psycopg.Error as exc:
                    if attempt == 0 and self._is_connection_error(exc):
                        self._drop_connection()
                        continue
                    raise StorageError(f"catalog read failed ({exc})") from exc
        raise AssertionError("unreachable")

    def _live(self) -> Any:
        """The connection statements run on (inside a transaction: the one it began on, never a new one)."""
        if self._conn is None:
            raise StorageError(f"the connection to the catalog {self.path!r} was lost")
        return self._conn

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"catalog {self.path!r} is closed")

    # -- other processes' commits ------------------------------------------------------------------------------
    def read_generation(self) -> int:
        """The newest committed generation: pushed by NOTIFY / the listener's poll (no SQL on this thread while the
        listener is healthy), else read from the database. ``generation`` follows it, so the core's next route
        catches up from the change log."""
        if self._listener is None or time.monotonic() - self._listener_ok_at > 2 * self.poll_interval_s + 1:
            self._saw(int(self.get_meta("generation") or 0))
        return self.generation

    def _saw(self, committed: int) -> None:
        """Another process committed up to ``committed``: the core's next route or mutation catches up."""
        self._notified = max(self._notified, committed)
        self.generation = max(self.generation, committed)  # an int store is atomic; the core reads it once per catch-up

    def _listen(self) -> None:
        """Listener thread: LISTEN for commits, poll the generation as a fallback, reconnect forever."""
        delay = 0.1
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._open_connection()
                conn.execute(f"LISTEN {CHANNEL}")
                delay = 0.1
                while not self._stop.is_set():
                    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
                    self._saw(int(row[0]))
                    self._listener_ok_at = time.monotonic()
                    for note in conn.notifies(timeout=self.poll_interval_s, stop_after=1):
                        self._saw(int(note.payload))
                        self._listener_ok_at = time.monotonic()
            except Exception:  # noqa: BLE001 - server restarting/unreachable: try again shortly
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):  # closing a dead connection/pool must not fail
                        conn.close()

    # -- engine-specific operations ----------------------------------------------------------------------------
    def compact(self) -> int:
        """``VACUUM FULL`` of the catalog's tables (briefly locks them); returns the bytes the database shrank by."""
        with self._lock:
            self._check_open()
            try:
                if self._conn is None:
                    self._connect()
                before = self.size_bytes()
                for table in ("adapters", "tags", "weights", "members", "aliases", "merges", "changes", "meta"):
                    self._conn.execute(f"VACUUM (FULL, ANALYZE) {table}")
                return max(0, before - self.size_bytes())
            except self._psycopg.Error as exc:
                raise StorageError(f"catalog compaction failed ({exc}); nothing was changed") from exc

    def size_bytes(self) -> int:
        """On-disk size of the catalog's tables and indexes (TOAST included)."""
        rows = self._read(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n ON"
            " n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        )  # fmt: skip
        return int(rows[0][0])

    def close(self) -> None:
        self._closed = True
        self._stop.set()  # the listener (a daemon thread) ends within one poll interval; close() does not wait
        with self._lock:
            self._drop_connection()


class PostgresBlobStore:
    """The weight store of a PostgreSQL library that has no ``weights_path``: content-addressed ``bytea`` rows
    in a ``blobs`` table of the same database (a :class:`~smoa.storage.base.WeightStore`).

    Same rules as the file and S3 stores — written (own transaction) before the catalog row that names it
    commits, deleted after the last row naming it is gone, checked against its sha256 on read — so every process
    sharing the database sees every weight without any shared disk. Fine up to a few MB per adapter (PostgreSQL
    TOASTs large values; one value may be up to 1 GB); bigger libraries should name an object store.
    """

    def __init__(self, catalog: PostgresCatalog) -> None:
        self.catalog = catalog
        with catalog.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS blobs(rel TEXT PRIMARY KEY, data BYTEA NOT NULL,"
                       " created_at DOUBLE PRECISION NOT NULL)")

    def write(self, area: str, digest: str, data: bytes) -> str:
        from smoa.storage.s3 import AREAS

        area = {"blobs": "weights/hot", "cold": "weights/cold"}.get(area, area)
        if area not in AREAS or len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise StorageError(f"invalid blob address {area!r}/{digest!r}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StorageError(f"refusing to store {area}/{digest[:12]}...: the bytes do not hash to their name")
        rel = f"{area}/{digest[:2]}/{digest}"
        self._write("INSERT OR REPLACE INTO blobs(rel, data, created_at) VALUES(?, ?, ?)", (rel, data, time.time()))
        return rel

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        """Inside this thread's open catalog transaction (a bulk create writes its files while inserting rows),
        join it: the blobs then commit with the rows. Otherwise one transaction of its own."""
        with self.catalog._lock:
            if self.catalog._in_txn:
                self.catalog._db.execute(sql, params)
                return
            with self.catalog.transaction() as db:
                db.execute(sql, params)

    def read(self, rel: str, *, name: str) -> bytes:
        from smoa.storage.s3 import check_rel

        _area, digest = check_rel(rel, name)
        rows = self.catalog._read("SELECT data FROM blobs WHERE rel = ?", (rel,))
        if not rows:
            raise CorruptAdapterError(f"{name}: weight blob {rel!r} is missing from the catalog database")
        data = bytes(rows[0][0])
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptAdapterError(f"{name}: weight blob {rel!r} fails its checksum")
        return data

    def delete(self, rel: str) -> None:
        # not if a row (of another process, say) has come to name it meanwhile
        self._write("DELETE FROM blobs WHERE rel = ? AND NOT EXISTS (SELECT 1 FROM weights WHERE file = ?)", (rel, rel))

    def owned_files(self) -> set[str]:
        return {str(r[0]) for r in self.catalog._read("SELECT rel FROM blobs")}

    all_files = owned_files

    def collect_garbage(self, referenced: set[str], min_age_s: float = 3600.0) -> int:
        """Delete blobs no row references that are older than ``min_age_s`` (another process writes its blob
        before its row commits: a young unreferenced blob may be about to be named). Returns how many."""
        with self.catalog.transaction() as db:
            cur = db.execute("DELETE FROM blobs WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM weights w WHERE"
                             " w.file = blobs.rel)", (time.time() - min_age_s,))  # fmt: skip
            return int(cur.rowcount or 0)

    def close(self) -> None:
        """Nothing to release (the catalog owns the connection)."""


def open_blob_store(catalog: PostgresCatalog, config: Any = None) -> PostgresBlobStore:
    """The weight store of a PostgreSQL library without ``weights_path`` (weights as ``bytea`` rows)."""
    return PostgresBlobStore(catalog)


def open_catalog(url: str, config: Any = None) -> PostgresCatalog:
    """Factory registered for ``postgresql://`` / ``postgres://`` in :mod:`smoa.storage.base`."""
    extra = getattr(config, "extra", None) or {}
    return PostgresCatalog(
        str(url),
        poll_interval_s=float(extra.get("pg_poll_interval_s", 1.0)),
        reconnect_timeout_s=float(extra.get("pg_reconnect_timeout_s", 30.0)),
    )
