"""Finding 9: empty bulk calls return empty lists (no numpy error)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from smoa.mixture import SparseAdapterMixture

from .conftest import config


def test_empty_bulk_create_and_delete(tmp_path: Path) -> None:
    with SparseAdapterMixture(config(tmp_path / "m")) as smoa:
        assert smoa.create_adapters_sync([]) == []
        assert asyncio.run(smoa.create_adapters([])) == []
        assert smoa.create_adapters_sync([], learn_keys=True) == []
        assert smoa.delete_adapters_sync([]) == []
        assert smoa.library.generation == 0 or smoa.library.total_adapters == 0
