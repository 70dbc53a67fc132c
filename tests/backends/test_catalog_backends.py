"""The PostgreSQL catalog against the SQLite one (the reference implementation), on a real PostgreSQL server.

The same random sequences of catalog mutations run on both backends; after every sequence the two hold the same
rows in every table (bit for bit), the same generation and the same change log.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from smoa.errors import AdapterNotFoundError, InvalidInputError, SmoaError, StorageError

from .helpers import dump, make_row, open_catalog


@pytest.fixture(params=["sqlite", "postgres"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    where = tmp_path / "catalog.sqlite3" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    cat = open_catalog(request.param, where)
    yield cat
    cat.close()


def _random_ops(cat: Any, rng: random.Random, steps: int) -> list[str]:
    """Apply ``steps`` random mutations; returns what was done (for failure messages). Deterministic per seed."""
    done: list[str] = []
    next_id = 0
    live: list[tuple[int, str]] = []  # (key, id) of active/archived adapters
    merges: list[int] = []
    for _ in range(steps):
        op = rng.choice(["insert", "insert", "weights", "fields", "keys", "delete", "archive", "pin", "usage",
                         "merge", "undo", "meta"])  # fmt: skip
        if op == "insert" or not live:
            n = rng.randint(1, 4)
            rows = [make_row(next_id + j, random.Random(next_id + j)) for j in range(n)]
            keys = cat.insert_many(rows)
            live += [(k, r.id) for k, r in zip(keys, rows)]
            next_id += n
            done.append(f"insert {n}")
            continue
        key, aid = rng.choice(live)
        if op == "weights":
            data = rng.randbytes(64)
            cat.replace_weights(key, data, None, "c" * 64, len(data), rng.randbytes(16) if rng.random() < 0.5 else None)
        elif op == "fields":
            cat.update_fields(key, domain_tags=[f"d{rng.randint(0, 9)}"], description=f"new {rng.random():.3f}",
                              examples=["e1", "e2"] if rng.random() < 0.5 else None, metadata={"v": 1})  # fmt: skip
        elif op == "keys":
            cat.set_embeddings([(key, rng.randbytes(32))])
        elif op == "delete":
            cat.delete([key])
            live.remove((key, aid))
        elif op == "archive":
            cat.set_status(key, rng.choice(["archived", "active"]))
        elif op == "pin":
            cat.set_pinned(key, rng.random() < 0.5)
        elif op == "usage":
            cat.record_usage({key: rng.randint(1, 5)}, {key: (1_700_000_000.5, 7)}, rng.randint(1, 100))
        elif op == "merge" and len(live) >= 3:
            (k1, i1), (k2, i2) = rng.sample([x for x in live if x != (key, aid)], 2)
            rel = f"weights/cold/{'ab'}/{'ab' * 32}"
            merges.append(cat.record_merge([(k1, i1, rel), (k2, i2, rel)], aid, "svd"))
            live = [x for x in live if x not in ((k1, i1), (k2, i2))]
        elif op == "undo" and merges:
            mid = merges.pop()
            _merged, sources, _undone = cat.merge_info(mid)
            try:  # a source or the merged adapter may be gone by now: both backends must say so alike
                keys = [cat.key_of(s) for s in sources]
                cat.undo_merge(mid, [(k, b"restored", None) for k in keys], None)
            except SmoaError as exc:
                done.append(f"undo refused: {type(exc).__name__}")
                continue
            live += [(cat.key_of(s), s) for s in sources]
        elif op == "meta":
            cat.set_meta("encoder", rng.choice(["hash", "static"]))
        done.append(op)
    return done


def _comparable(state: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    out = dict(state)
    out["merges"] = [(r[0], *r[2:]) for r in state["merges"]]  # created_at is the wall clock of each run
    return out


@pytest.mark.parametrize("seed", [0, 1, *(pytest.param(i, marks=pytest.mark.slow) for i in range(2, 30))])
def test_same_mutations_same_state_as_sqlite(seed: int, pg_url: str, tmp_path: Path) -> None:
    lite = open_catalog("sqlite", tmp_path / "catalog.sqlite3")
    pg = open_catalog("postgres", pg_url)
    try:
        ops_l = _random_ops(lite, random.Random(seed), 60)
        ops_p = _random_ops(pg, random.Random(seed), 60)
        assert ops_l == ops_p
        assert _comparable(dump(pg)) == _comparable(dump(lite)), ops_l
        assert pg.generation == lite.generation == int(pg.get_meta("generation"))
        for g in (0, 1, lite.generation // 2, lite.generation - 1, lite.generation):
            assert pg.changes_since(g) == lite.changes_since(g), g
        assert list(pg.directory_rows()) == list(lite.directory_rows())
        assert list(pg.routing_rows()) == list(lite.routing_rows())
        assert pg.page(("active", "archived"), 2, 5) == lite.page(("active", "archived"), 2, 5)
        assert pg.count() == lite.count() and pg.aliases() == lite.aliases()
    finally:
        lite.close()
        pg.close()


def test_round_trip_and_errors(catalog: Any) -> None:
    rows = [make_row(i) for i in range(5)]
    keys = catalog.insert_many(rows)
    assert keys == [1, 2, 3, 4, 5] and catalog.generation == 1
    got = catalog.get("ad_000003")
    assert (got.key, got.domain_tags, got.examples, got.metadata) == (4, ["med", "t3"], ["example 3"], {"i": 3, "note": "xxx"})
    blob, file, digest, version = catalog.read_weights(4)
    assert (blob, file, digest, version) == (rows[3].blob, None, rows[3].checksum, 1)
    assert catalog.replace_weights(4, b"new", None, "d" * 64, 3, None) == 2
    assert catalog.read_weights(4)[::3] == (b"new", 2)
    assert catalog.changes_since(1) == [4]
    with pytest.raises(AdapterNotFoundError):
        catalog.get("ad_missing")
    with pytest.raises(AdapterNotFoundError):
        catalog.read_weights(999)
    with pytest.raises(InvalidInputError):
        catalog.undo_merge(12345, [], None)
    gen = catalog.generation
    with pytest.raises(StorageError, match="nothing was changed"):
        catalog.insert_many([make_row(100), make_row(100)])  # duplicate id: the whole call rolls back
    assert catalog.generation == gen and catalog.count() == 5
    with pytest.raises(ZeroDivisionError), catalog.transaction(bump=True) as db:
        db.execute("DELETE FROM adapters WHERE key = ?", (1,))
        raise ZeroDivisionError
    assert catalog.count() == 5 and catalog.generation == gen
    # composite members, aliases, bulk delete, compaction
    comp = catalog.insert_many([make_row(50, members=[("ad_000000", 0.5), ("ad_000001", 0.5)])])[0]
    assert catalog.members_of(comp) == [("ad_000000", 0.5), ("ad_000001", 0.5)]
    assert catalog.composites_containing("ad_000001") == ["ad_000050"]
    catalog.delete(keys[:3])
    assert catalog.count() == 3
    assert catalog.compact() >= 0


def test_inline_weights_are_bytea_bit_for_bit(pg_url: str) -> None:
    cat = open_catalog("postgres", pg_url)
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB, every byte value, incl. NUL
        key = cat.insert_many([make_row(1, data=payload)])[0]
        assert cat.read_weights(key)[0] == payload
        kind = cat._read("SELECT data_type FROM information_schema.columns WHERE table_name = 'weights' AND column_name = 'data'")
        assert kind == [("bytea",)]
    finally:
        cat.close()


def test_schema_and_sql_dialect_rewrites() -> None:
    from smoa.storage import catalog as sqlite_catalog
    from smoa.storage.postgres import schema_ddl, to_postgres

    ddl = schema_ddl(sqlite_catalog._SCHEMA)
    assert "BLOB" not in ddl and "WITHOUT ROWID" not in ddl and "merge_id BIGSERIAL PRIMARY KEY" in ddl
    assert to_postgres("INSERT OR IGNORE INTO meta VALUES(?, ?)")[0] == "INSERT INTO meta VALUES(%s, %s) ON CONFLICT DO NOTHING"
    assert to_postgres("SELECT '100%' FROM t WHERE a = ?")[0] == "SELECT '100%%' FROM t WHERE a = %s"
    assert to_postgres("INSERT INTO merges(a) VALUES(?)")[1] == "merge_id"


def test_weights_in_the_database_when_no_object_store_is_named(pg_url: str) -> None:
    import hashlib

    from smoa.errors import CorruptAdapterError
    from smoa.storage.postgres import PostgresBlobStore

    cat = open_catalog("postgres", pg_url)
    try:
        store = PostgresBlobStore(cat)
        data = bytes(range(256)) * 10
        rel = store.write("weights/hot", hashlib.sha256(data).hexdigest(), data)
        assert store.write("weights/hot", hashlib.sha256(data).hexdigest(), data) == rel  # idempotent
        assert store.read(rel, name="a") == data and store.owned_files() == {rel}
        key = cat.insert_many([make_row(1, file=rel, data=data)])[0]
        assert store.collect_garbage(set(), min_age_s=0) == 0  # referenced: kept
        store.delete(rel)
        assert store.read(rel, name="a") == data  # a row still names it: the delete is refused
        cat.delete([key])
        store.delete(rel)
        with pytest.raises(CorruptAdapterError, match="missing"):
            store.read(rel, name="a")
        orphan = b"orphan"
        store.write("weights/cold", hashlib.sha256(orphan).hexdigest(), orphan)
        assert store.collect_garbage(set()) == 0  # young: another process may be about to commit its row
        assert store.collect_garbage(set(), min_age_s=0) == 1
        with pytest.raises(StorageError, match="do not hash"):
            store.write("weights/hot", "0" * 64, b"x")
    finally:
        cat.close()


def test_change_log_triggers_follow_the_sqlite_schema(pg_url: str) -> None:
    from smoa.storage import catalog as sqlite_catalog
    from smoa.storage.postgres import log_ddl

    _ddl, wanted = log_ddl(sqlite_catalog._LOG_SCHEMA)
    assert len(wanted) == sqlite_catalog._LOG_SCHEMA.count("CREATE TRIGGER")
    cat = open_catalog("postgres", pg_url)
    try:  # a trigger an older version made (and this one lacks) is dropped at the next open
        with cat.transaction() as db:
            db.execute("CREATE OR REPLACE FUNCTION smoa_old() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
            db.execute("CREATE TRIGGER log_obsolete AFTER INSERT ON tags FOR EACH ROW EXECUTE FUNCTION smoa_old()")
    finally:
        cat.close()
    cat = open_catalog("postgres", pg_url)
    try:
        names = {r[0] for r in cat._read("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
        assert names == {n for n, _ in wanted}
    finally:
        cat.close()
    with pytest.raises(StorageError, match="changed shape"):
        log_ddl("CREATE TRIGGER IF NOT EXISTS x AFTER INSERT ON t BEGIN SELECT 1; END;")
