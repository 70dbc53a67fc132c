"""Shared pieces of the reliability tests: a tiny profile, seeded weights and a library-state snapshot."""

from __future__ import annotations

import copy
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import torch

from smoa import SMoAConfig
from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights, checksum
from smoa.library import AdapterLibrary

# 4 layers x (q: 64 -> 64, v: 64 -> 32), as tests/test_library.py
TINY = BaseProfile("tiny", tuple((f"layers.{i}.{n}", 64, o) for i in range(4) for n, o in (("q", 64), ("v", 32))))
TABLES = ("meta", "adapters", "tags", "weights", "members", "aliases", "merges")


def config(path: Path, **kw: Any) -> SMoAConfig:
    """A persistent library config; ``blob_inline_max_bytes=1500`` sends rank >= 4 adapters to files."""
    kw.setdefault("blob_inline_max_bytes", 1500)
    kw.setdefault("seed", 0)
    return SMoAConfig(storage_path=path, **kw)


def open_lib(path: Path, **kw: Any) -> AdapterLibrary:
    return AdapterLibrary(config(path, **kw), TINY)


def seeded_weights(
    seed: int,
    modules: tuple[str, ...] = ("layers.0.q", "layers.2.v"),
    rank: int = 2,
    dtype: torch.dtype = torch.float32,
    profile: BaseProfile = TINY,
    scale: float = 1.0,
) -> LoraWeights:
    """Random non-zero ``A [rank, d_in]`` and ``B [d_out, rank]`` for each module (``alpha = 2 * rank``)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules:
        d_in, d_out = profile.shape(m)
        a = (torch.randn(rank, d_in, generator=g) * scale).to(dtype)
        b = (torch.randn(d_out, rank, generator=g) * scale).to(dtype)
        factors[m] = (a, b)
    return LoraWeights(factors, alpha=2.0 * rank, rank=rank)


def state(lib: AdapterLibrary) -> dict[str, Any]:
    """Everything persistent about a library: every catalog row (minus usage counters) and every file's hash."""
    db = sqlite3.connect(f"file:{lib.directory / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        out: dict[str, Any] = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
    finally:
        db.close()
    out["files"] = {rel: checksum((lib.directory / rel).read_bytes()) for rel in sorted(lib.files.all_files())}
    return out


def assert_consistent(lib: AdapterLibrary) -> None:
    """No half-visible adapter: every row has weights, every weight file exists and is referenced, no temp files."""
    cat = lib.catalog
    n_rows = cat._read("SELECT COUNT(*) FROM adapters")[0][0]
    n_weights = cat._read("SELECT COUNT(*) FROM weights")[0][0]
    assert n_rows == n_weights, (n_rows, n_weights)
    assert lib.total_adapters == cat.count()
    assert cat._read("SELECT COUNT(*) FROM weights WHERE key NOT IN (SELECT key FROM adapters)")[0][0] == 0
    assert cat._read("SELECT COUNT(*) FROM tags WHERE key NOT IN (SELECT key FROM adapters)")[0][0] == 0
    referenced = cat.all_files()
    on_disk = lib.files.all_files()
    assert referenced <= on_disk, f"rows reference missing files: {referenced - on_disk}"
    for area in ("blobs", "cold"):
        assert not list((lib.directory / area).glob("*/.tmp-*")), "temporary files left behind"


def files_under(root: Path) -> set[str]:
    """Every path under ``root`` (relative), directories included."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


class Oracle:
    """Dense reference: a separate model copy with merged weights, one row at a time."""

    def __init__(self, model: torch.nn.Module, profile: BaseProfile) -> None:
        self.model = copy.deepcopy(model)
        self.mods = dict(self.model.named_modules())
        self.base = {m: self.mods[m].weight.detach().clone() for m in profile.module_names}
        self.lock = threading.Lock()

    def logits(self, ids: list[int], mixture: list[tuple[LoraWeights, float]]) -> torch.Tensor:
        """``[T, vocab]`` logits of one row under ``W + sum w * s * B @ A``."""
        deltas: dict[str, torch.Tensor] = {}
        for weights, w in mixture:
            for m, (a, b) in weights.items():
                d = w * weights.scaling * (b.double() @ a.double())  # [d_out, d_in]
                deltas[m] = deltas[m] + d if m in deltas else d
        with self.lock, torch.no_grad():
            try:
                for m, d in deltas.items():
                    self.mods[m].weight.copy_((self.base[m].double() + d).float())
                return self.model(input_ids=torch.tensor([ids])).logits[0]
            finally:
                for m in deltas:
                    self.mods[m].weight.copy_(self.base[m])
