"""Shared pieces of the backend tests: rows to insert, opening a catalog of either kind, dumping its state."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.spec import AdapterSpec
from smoa.adapter.weights import LoraWeights
from smoa.config import SMoAConfig
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


# == the library through the core (test_library_backends.py and its worker processes) ==============
TINY = BaseProfile("tiny-backends", tuple((f"layers.{i}.{n}", 16, o) for i in range(2) for n, o in (("q", 16), ("v", 8))))
MODULES = ("layers.0.q", "layers.1.v")


def weights(seed: int, rank: int = 2) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    f = {}
    for m in MODULES:
        d_in, d_out = TINY.shape(m)
        f[m] = (0.1 * torch.randn(rank, d_in, generator=g), 0.1 * torch.randn(d_out, rank, generator=g))
    return LoraWeights(f, 2.0 * rank, rank)


def same(x: LoraWeights, y: LoraWeights) -> bool:
    return list(x.factors) == list(y.factors) and x.alpha == y.alpha and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(x.factors.values(), y.factors.values())
    )


def make_config(backend: dict[str, Any], **kw: Any) -> SMoAConfig:
    kw.setdefault("encoder", "hash")
    kw.setdefault("seed", 0)
    kw.setdefault("base_profile", TINY)
    kw.setdefault("blob_inline_max_bytes", 400)  # rank >= 2 adapters go to weight files / objects
    extra = dict(kw.pop("extra", {}))
    if backend.get("cache_dir"):
        extra.setdefault("weights_cache_path", backend["cache_dir"])
    return SMoAConfig(storage_path=backend["storage_path"], weights_path=backend["weights_path"], extra=extra, **kw)


def open_core(backend: dict[str, Any], **kw: Any) -> Any:
    from smoa.core import LibraryCore

    return LibraryCore(make_config(backend, **kw), TINY)


def spec(i: int, rank: int = 2, tag: str | None = None) -> AdapterSpec:
    return AdapterSpec(weights=weights(i, rank), domain_tags=[tag or f"topic{i % 5}"], description=f"topic {i % 5}")
