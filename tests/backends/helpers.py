"""Shared pieces of the backend tests: rows to insert, opening a catalog of either kind, dumping its state."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

from smoa.storage.catalog import Catalog, NewAdapterRow

TABLE_ORDER = {"adapters": "key", "tags": "key, kind, position", "weights": "key", "members": "composite, position",
               "aliases": "alias", "merges": "merge_id"}  # fmt: skip


def make_row(i: int, rng: random.Random | None = None, *, file: str | None = None, data: bytes | None = None,
             members: list[tuple[str, float]] | None = None, tag: str = "med") -> NewAdapterRow:  # fmt: skip
    """One adapter row with inline weights (random bytes) unless ``file`` is given."""
    rng = rng or random.Random(i)
    data = data if data is not None else rng.randbytes(96)
    return NewAdapterRow(
        id=f"ad_{i:06d}", specialization="composite" if members else "domain", granularity="nano", rank=2,
        alpha=4.0, description=f"adapter {i} ünïcode", target_modules=["model.layers.0.self_attn.q_proj"],
        num_parameters=1152, profile="smollm2-135m", checksum=hashlib.sha256(data).hexdigest(),
        blob=None if file else data, file=file, nbytes=len(data), created_at=1_700_000_000.0 + i,
        domain_tags=[tag, f"t{i % 7}"], skill_tags=["qa"], metadata={"i": i, "note": "x" * (i % 5)},
        embedding=rng.randbytes(16), members=members, examples=[f"example {i}"],
    )  # fmt: skip


def open_catalog(kind: str, where: str | Path, **kwargs: Any) -> Any:
    """``Catalog`` (SQLite file) or ``PostgresCatalog`` (URL)."""
    if kind == "sqlite":
        return Catalog(Path(where))
    from smoa.storage.postgres import PostgresCatalog

    return PostgresCatalog(str(where), **kwargs)


def dump(catalog: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a fixed order, with bytes as bytes: comparable across backends."""
    from smoa.storage.migrate import columns

    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, order in TABLE_ORDER.items():
        names = columns(catalog, table)
        out[table] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                      for r in catalog._read(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}")]  # fmt: skip
    meta = dict(catalog._read("SELECT key, value FROM meta"))
    out["meta"] = sorted((k, v) for k, v in meta.items() if not k.startswith("migration"))
    return out


def wait_for(predicate: Any, timeout: float, interval: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start
