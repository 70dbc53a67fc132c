"""Fixtures of the Ray tests: one local Ray (``num_cpus=2``, no dashboard, 200 MB object store) per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray for the whole session (started once: it takes ~5 s)."""
    from smoa.serve.ray import init_local_ray

    init_local_ray(num_cpus=2, object_store_mb=200)
    yield
    ray.shutdown()
