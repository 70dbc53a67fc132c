"""Routing indexes: vectors (exact / HNSW-SQ8), tags (inverted index), groups (hierarchical), persistence."""

from __future__ import annotations

from smoa.routing.index.groups import GroupIndex
from smoa.routing.index.store import StaleIndexError, load_indexes, save_indexes
from smoa.routing.index.tags import TagIndex
from smoa.routing.index.vector import IndexParams, VectorIndex

__all__ = ["GroupIndex", "IndexParams", "StaleIndexError", "TagIndex", "VectorIndex", "load_indexes", "save_indexes"]
