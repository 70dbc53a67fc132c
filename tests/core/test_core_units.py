"""Smaller core behaviours: pins seen by prune at once, list/compact, set_routing_keys checks, closed core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoa.adapter.spec import AdapterSpec
from smoa.errors import InvalidInputError

from .conftest import open_core, weights


def test_a_pin_protects_from_the_next_prune_at_once(core) -> None:
    a, b = core.create_many([AdapterSpec(weights=weights(0)), AdapterSpec(weights=weights(1))])
    core.pin(a.id)
    assert [i for i, _ in core.prune([a.id, b.id], "archive")] == [b.id]
    core.unpin(a.id)
    assert [i for i, _ in core.prune([a.id], "delete")] == [a.id] and a.id not in core


def test_list_adapters_pages_and_filters_by_normalised_tag(core) -> None:
    made = core.create_many([AdapterSpec(weights=weights(i), domain_tags=["Medical" if i % 2 else "legal"])
                             for i in range(7)])  # fmt: skip
    assert [a.id for a in core.list_adapters(offset=2, limit=3)] == [a.id for a in made[2:5]]
    assert [a.id for a in core.list_adapters("ＭＥＤＩＣＡＬ")] == [a.id for a in made[1::2]]
    with pytest.raises(InvalidInputError, match="limit"):
        core.list_adapters(limit=-1)


def test_compact_reclaims_the_space_of_deleted_adapters(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    made = core.create_many([AdapterSpec(weights=weights(i, rank=8)) for i in range(300)])
    core.compact()
    db = tmp_path / "lib" / "catalog.sqlite3"
    full = db.stat().st_size
    core.delete_many([a.id for a in made[:200]])
    assert core.compact() > 0 and db.stat().st_size < 0.6 * full
    assert core.total_adapters == 100 and all(a.id in core for a in made[200:])
    core.close()


def test_set_routing_keys_checks_shape_and_keeps_every_vector(core) -> None:
    a = core.create(AdapterSpec(weights=weights(0)))
    dim = core.router.dim
    with pytest.raises(InvalidInputError, match="vectors"):
        core.set_routing_keys(a.id, np.ones(dim + 1, np.float32))
    with pytest.raises(InvalidInputError, match="zero"):
        core.set_routing_keys(a.id, np.zeros(dim, np.float32))
    keys = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    core.set_routing_keys(a.id, keys)
    stored = core.routing_keys_of(a.id)
    assert stored.shape == (3, dim)
    np.testing.assert_allclose(stored, keys / np.linalg.norm(keys, axis=1, keepdims=True), rtol=1e-6)


def test_a_closed_core_refuses_with_a_smoa_error(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    core.close()
    for call in (lambda: core.route("x"), lambda: core.create(AdapterSpec()), lambda: core.get_adapter("ad_x")):
        with pytest.raises(InvalidInputError, match="closed"):
            call()


def test_eager_loading_fills_the_cache_at_open(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    core.create_many([AdapterSpec(weights=weights(i)) for i in range(6)])
    core.close()
    lazy = open_core(tmp_path / "lib")
    assert lazy.loaded_adapters == 0
    lazy.close()
    eager = open_core(tmp_path / "lib", lazy_loading=False, max_loaded_adapters=4)
    assert eager.loaded_adapters == 4  # up to the cache's size, at open
    eager.close()
