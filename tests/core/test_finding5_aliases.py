"""Finding 5: after a merge, deleting an old (alias) id forgets only that id; `undo_merge` is all or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smoa.adapter.spec import AdapterSpec
from smoa.compose.merge import combine_mean
from smoa.errors import CorruptAdapterError

from .conftest import open_core, weights

TAGS = ("anatomy", "botany", "chemistry")


def _merged(core):
    a, b, c = core.create_many([AdapterSpec(weights=weights(i), domain_tags=[t]) for i, t in enumerate(TAGS)])
    spec = AdapterSpec(weights=combine_mean([weights(0), weights(1)], "cat"), domain_tags=["anatomy", "botany"])
    new, merge_id = core.merge([a.id, b.id], spec, "cat")
    return a, b, c, new, merge_id


def _state(core) -> dict[str, object]:
    return {
        "adapters": sorted((ad.id, ad.status, ad.version) for ad in core.iter_adapters(("active", "archived", "merged"))),
        "aliases": sorted(core.catalog.aliases().items()),
        "routes": [core.route(t, metadata={"domain": t}, strategy="task_based", k=3).adapter_ids for t in TAGS],
        "weights": {ad.id: core.get_weights(ad.id).to_bytes() for ad in core.iter_adapters(("active",))},
    }


def test_deleting_an_alias_keeps_the_merged_adapter_and_the_other_source(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    a, b, _c, new, _ = _merged(core)
    merged_bytes = core.get_weights(new.id).to_bytes()
    assert core.resolve(a.id) == core.resolve(b.id) == new.id
    gone = core.delete(a.id)  # an old id: only that id goes
    assert gone.id == a.id and gone.status == "merged"
    assert new.id in core and core.get_weights(new.id).to_bytes() == merged_bytes
    assert core.resolve(b.id) == new.id and a.id not in core
    assert new.id in core.route("anatomy", metadata={"domain": "anatomy"}, strategy="task_based").adapter_ids
    core.close()
    core = open_core(tmp_path / "lib")  # and so it stays after a reopen
    assert new.id in core and core.resolve(b.id) == new.id and a.id not in core
    core.close()


def test_undo_merge_restores_everything(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    a, b, _c, new, merge_id = _merged(core)
    assert sorted(core.undo_merge(merge_id)) == sorted([a.id, b.id])
    assert new.id not in core and core.resolve(a.id) == a.id
    for src, seed in ((a, 0), (b, 1)):
        assert core.get_adapter(src.id).status == "active"
        w, ref = core.get_weights(src.id), weights(seed)
        for m in ref:
            torch.testing.assert_close(w[m][0], ref[m][0], rtol=0, atol=0)
        assert core.route(src.domain_tags[0], metadata={"domain": src.domain_tags[0]}, strategy="task_based").adapter_ids[0] == src.id
    core.close()


def test_undo_merge_that_fails_changes_nothing(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    a, b, _c, new, merge_id = _merged(core)
    before = _state(core)
    _, file, _, _ = core.catalog.read_weights(core.catalog.get(b.id).key)  # b's retained cold copy
    path = core.directory / file
    good = path.read_bytes()
    path.write_bytes(good[:-8] + b"\x00" * 8)  # torn: the undo must verify it before changing anything
    with pytest.raises(CorruptAdapterError):
        core.undo_merge(merge_id)
    assert _state(core) == before
    path.write_bytes(good)  # repaired: now it undoes completely
    assert sorted(core.undo_merge(merge_id)) == sorted([a.id, b.id]) and new.id not in core
    core.close()


def test_undo_after_an_alias_delete_restores_the_remaining_source(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    a, b, _c, new, merge_id = _merged(core)
    core.delete(a.id)
    assert core.undo_merge(merge_id) == [b.id]
    assert a.id not in core and b.id in core and new.id not in core
    core.close()
