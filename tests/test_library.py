from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from smoa import (
    AdapterGranularity,
    AdapterNotFoundError,
    AdapterSpec,
    AdapterSpecialization,
    CapacityError,
    CorruptAdapterError,
    InvalidInputError,
    LibraryLockedError,
    NonFiniteWeightsError,
    ProfileMismatchError,
    SMoAConfig,
)
from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights
from smoa.library import AdapterLibrary

TINY = BaseProfile("tiny", tuple((f"layers.{i}.{n}", 64, o) for i in range(4) for n, o in (("q", 64), ("v", 32))))


def _lib(tmp_path, **kw) -> AdapterLibrary:
    return AdapterLibrary(SMoAConfig(storage_path=tmp_path / "lib", seed=0, **kw), TINY)


def _weights(seed: int, modules=("layers.0.q", "layers.2.v"), rank: int = 2) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        {m: (torch.randn(rank, TINY.shape(m)[0], generator=g), torch.randn(TINY.shape(m)[1], rank, generator=g))
         for m in modules},
        alpha=4.0, rank=rank,
    )  # fmt: skip


def test_create_nano_and_reopen_bit_for_bit(tmp_path) -> None:
    lib = _lib(tmp_path)
    fresh = lib.create(AdapterSpec(AdapterSpecialization.DOMAIN, ["medical", "radiology"], ["diagnosis"],
                                   AdapterGranularity.NANO, rank=2, description="chest x-rays"))  # fmt: skip
    given = lib.create(AdapterSpec(weights=_weights(1), domain_tags=["law"], metadata={"owner": "ünïcode ✓"}),
                       embedding=np.arange(4, dtype=np.float32))  # fmt: skip
    assert 1_000 <= fresh.num_parameters <= 10_000 and fresh.rank == 2 and fresh.alpha == 4.0
    before = {a.id: lib.get_weights(a.id) for a in (fresh, given)}
    lib.close()
    lib = _lib(tmp_path)
    assert lib.total_adapters == 2
    got = lib.get_adapter(fresh.id)
    assert got.domain_tags == ["medical", "radiology"] and got.skill_tags == ["diagnosis"]
    assert got.specialization is AdapterSpecialization.DOMAIN and got.description == "chest x-rays"
    assert lib.get_adapter(given.id).metadata == {"owner": "ünïcode ✓"}
    for aid, w in before.items():
        back = lib.get_weights(aid)
        assert list(back) == list(w)
        for m in w:
            assert torch.equal(back[m][0], w[m][0]) and torch.equal(back[m][1], w[m][1])
    rows = list(lib.routing_rows())
    assert [r[0] for r in rows] == [fresh.key, given.key] and rows[0][1] is None
    assert np.array_equal(rows[1][1], np.arange(4, dtype=np.float32)) and rows[1][2] == ["law"]
    lib.close()


def test_bad_inputs_are_specific_and_write_nothing(tmp_path) -> None:
    lib = _lib(tmp_path, max_adapters=3)
    with pytest.raises(InvalidInputError, match="`domain_tags`"):
        lib.create(AdapterSpec(domain_tags=["ok", 7]))
    with pytest.raises(InvalidInputError, match="`domain_tags`"):
        lib.create(AdapterSpec(domain_tags="medical"))
    with pytest.raises(InvalidInputError, match="`specialization`"):
        lib.create(AdapterSpec(specialization="wizard"))
    with pytest.raises(InvalidInputError, match="`rank`"):
        lib.create(AdapterSpec(rank=0))
    bad = _weights(2)
    bad.factors["layers.0.q"][0][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError):
        lib.create(AdapterSpec(weights=bad))
    with pytest.raises(ProfileMismatchError):
        lib.create(AdapterSpec(weights={"layers.0.q": (torch.zeros(2, 63), torch.zeros(64, 2))}))
    # a bulk call with one bad entry writes none of them
    with pytest.raises(InvalidInputError, match="adapter 2"):
        lib.create_many([AdapterSpec(), AdapterSpec(), AdapterSpec(domain_tags=[None])])
    assert lib.total_adapters == 0 and lib.generation == 0
    lib.create_many([AdapterSpec()] * 3)
    with pytest.raises(CapacityError, match="`max_adapters`=3"):
        lib.create(AdapterSpec())
    with pytest.raises(AdapterNotFoundError, match="ad_nope"):
        lib.get_adapter("ad_nope")
    lib.close()


def test_corrupt_blob_is_named_and_others_keep_working(tmp_path) -> None:
    lib = _lib(tmp_path)
    a, b = lib.create_many([AdapterSpec(weights=_weights(1)), AdapterSpec(weights=_weights(2))])
    db = sqlite3.connect(tmp_path / "lib" / "catalog.sqlite3")
    blob = bytearray(db.execute("SELECT data FROM weights WHERE key = ?", (a.key,)).fetchone()[0])
    blob[-1] ^= 0xFF
    db.execute("UPDATE weights SET data = ? WHERE key = ?", (bytes(blob), a.key))
    db.commit()
    db.close()
    with pytest.raises(CorruptAdapterError, match=a.id):
        lib.get_weights(a.id)
    assert torch.equal(lib.get_weights(b.id)["layers.0.q"][0], _weights(2)["layers.0.q"][0])
    assert lib.cache.statistics()["loaded_adapters"] == 1
    lib.close()


def test_update_bumps_version_and_never_serves_stale(tmp_path) -> None:
    lib = _lib(tmp_path)
    a = lib.create(AdapterSpec(weights=_weights(1)))
    old = lib.get_weights(a.id)
    new = lib.update_weights(a.id, _weights(9))
    assert new.version == 2 and new.checksum != a.checksum
    assert torch.equal(lib.get_weights(a.id)["layers.0.q"][0], _weights(9)["layers.0.q"][0])
    assert not torch.equal(old["layers.0.q"][0], _weights(9)["layers.0.q"][0])
    lib.close()


def test_large_adapters_are_content_addressed_files(tmp_path) -> None:
    lib = _lib(tmp_path, blob_inline_max_bytes=100)
    a = lib.create(AdapterSpec(weights=_weights(1)))
    files = list((tmp_path / "lib" / "weights" / "hot").rglob("*"))
    rel = lib.catalog.read_weights(a.key)[1]  # named by the sha256 of its bytes (which carry the row in the header)
    assert rel is not None and any(str(f).endswith(rel) for f in files)
    assert torch.equal(lib.get_weights(a.id)["layers.2.v"][1], _weights(1)["layers.2.v"][1])
    lib.delete(a.id)
    assert not any(f.is_file() for f in (tmp_path / "lib" / "weights" / "hot").rglob("*"))
    lib.close()


def test_orphan_files_are_collected_at_open(tmp_path) -> None:
    lib = _lib(tmp_path)
    lib.close()
    orphan = tmp_path / "lib" / "weights" / "hot" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half-written")
    lib = _lib(tmp_path)
    assert lib.collected_files == 1 and not orphan.exists()
    lib.close()


def test_cache_bounds_and_pins(tmp_path) -> None:
    lib = _lib(tmp_path, max_loaded_adapters=2)
    ids = [a.id for a in lib.create_many([AdapterSpec(weights=_weights(i)) for i in range(4)])]
    lib.pin(ids[0])
    for aid in ids[1:]:
        lib.get_weights(aid)
    stats = lib.cache.statistics()
    assert stats["loaded_adapters"] == 2 and stats["evictions"] == 2
    assert lib.cache.is_loaded(ids[0], 1)
    assert lib.get_adapter(ids[0]).pinned
    lib.close()


def test_a_cache_full_of_pins_still_serves_reads_and_refuses_one_pin_more(tmp_path) -> None:
    """Pins may hold every slot: reads of other adapters still return their weights (uncached), and one pin more
    is refused with CacheFullError before the catalog marks it pinned."""
    from smoa import CacheFullError

    lib = _lib(tmp_path, max_loaded_adapters=2)
    ws = [_weights(i) for i in range(4)]
    ids = [a.id for a in lib.create_many([AdapterSpec(weights=w) for w in ws])]
    lib.pin(ids[0])
    lib.pin(ids[1])
    for _ in range(2):  # twice: not cached, so read again from the catalog, still the right weights
        got = lib.get_weights(ids[2])
        assert all(torch.equal(got[m][0], ws[2][m][0]) and torch.equal(got[m][1], ws[2][m][1]) for m in ws[2])
    stats = lib.cache.statistics()
    assert stats["uncached_loads"] == 2 and stats["loaded_adapters"] == 2
    with pytest.raises(CacheFullError, match="pinned"):
        lib.pin(ids[3])
    assert not lib.get_adapter(ids[3]).pinned and not lib.cache.is_loaded(ids[3], 1)
    lib.unpin(ids[1])
    lib.pin(ids[3])  # a slot is free again
    assert lib.get_adapter(ids[3]).pinned and lib.cache.is_loaded(ids[3], 1)
    lib.close()


def test_archive_and_restore(tmp_path) -> None:
    lib = _lib(tmp_path)
    a = lib.create(AdapterSpec(weights=_weights(1)))
    freed = lib.archive(a.id)
    assert freed > 0 and lib.get_adapter(a.id).status == "archived"
    assert list(lib.routing_rows()) == []
    assert lib.total_adapters == 1
    lib.restore(a.id)
    assert lib.get_adapter(a.id).status == "active"
    assert torch.equal(lib.get_weights(a.id)["layers.0.q"][0], _weights(1)["layers.0.q"][0])
    lib.close()


def test_usage_is_batched(tmp_path) -> None:
    lib = _lib(tmp_path)
    a = lib.create(AdapterSpec())
    for _ in range(5):
        lib.record_usage([a.id])
    assert lib.catalog.get(a.id).usage_count == 0  # not yet written: batched
    lib.flush_usage()
    got = lib.catalog.get(a.id)
    assert got.usage_count == 5 and got.last_used_at is not None
    lib.close()


def test_second_opener_is_refused(tmp_path) -> None:
    lib = _lib(tmp_path)
    with pytest.raises(LibraryLockedError, match="another process"):
        _lib(tmp_path)
    lib.close()
    _lib(tmp_path).close()


def test_other_profile_is_refused(tmp_path) -> None:
    _lib(tmp_path).close()
    other = BaseProfile("other", (("x", 4, 4),))
    with pytest.raises(ProfileMismatchError, match="tiny"):
        AdapterLibrary(SMoAConfig(storage_path=tmp_path / "lib"), other)


def test_temporary_library_is_removed(tmp_path) -> None:
    lib = AdapterLibrary(SMoAConfig(), TINY)
    d = lib.directory
    lib.create(AdapterSpec())
    lib.close()
    assert not d.exists()
