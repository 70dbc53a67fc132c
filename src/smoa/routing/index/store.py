"""Persistence of the routing indexes in a directory beside the catalog.

Files (each written to a temporary name, then renamed; ``meta.json`` last)::

    vectors.faiss  ids.npy  alive.npy  layout.npy   the vector index (see :mod:`smoa.routing.index.vector`)
    tags.npz                                         the tag index (adapter keys, combo ids, combos) and the groups
                                                     (names, running sums, members in CSR form), all plain arrays
    meta.json                                        format, generation, encoder, dim, kind, sha256 of every file
                                                     above

:func:`load_indexes` raises :class:`StaleIndexError` when anything is missing, unreadable, fails its checksum or
reflects another catalog generation / encoder; the router then rebuilds from the catalog with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from smoa.routing.index.groups import GroupIndex
from smoa.routing.index.tags import TagIndex
from smoa.routing.index.vector import IndexParams, VectorIndex

FORMAT = 2  # 1: tags.json, groups rebuilt at load
TAGS_FILE = "tags.npz"


class StaleIndexError(Exception):
    """The persisted indexes cannot be used (the message says why); rebuild them."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_indexes(
    directory: Path, vectors: VectorIndex, tags: TagIndex, generation: int, encoder: str,
    extra: Mapping[str, bytes] | None = None, groups: GroupIndex | None = None,
) -> None:
    """Write the indexes (``groups`` too, if given), the ``extra`` files (name -> bytes, e.g. the learned
    routing state) and their ``meta.json`` into ``directory`` (created if needed); every file is checksummed in
    ``meta.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    names = vectors.save(tmp)
    buf = io.BytesIO()
    np.savez(buf, **tags.to_arrays(), **(groups.to_arrays() if groups is not None else {}))
    (tmp / TAGS_FILE).write_bytes(buf.getvalue())
    names.append(TAGS_FILE)
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
        names.append(name)
    meta = {
        "format": FORMAT,
        "generation": int(generation),
        "encoder": encoder,
        "dim": vectors.dim,
        "kind": vectors.kind,
        "count": len(vectors),
        "sha256": {n: _sha256(tmp / n) for n in names},
    }
    (directory / "meta.json").unlink(missing_ok=True)  # a crash from here on leaves no valid meta -> rebuild
    for n in names:
        os.replace(tmp / n, directory / n)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp / "meta.json", directory / "meta.json")
    tmp.rmdir()


def load_indexes(
    directory: Path, generation: int, encoder: str, dim: int, params: IndexParams | None = None
) -> tuple[VectorIndex, TagIndex, GroupIndex | None]:
    """Load what :func:`save_indexes` wrote, if it reflects ``generation`` and ``encoder``: ``(vectors, tags,
    groups)``, ``groups`` ``None`` when they were not saved.

    Raises:
        StaleIndexError: missing, corrupt, or stale (the message names the reason).
    """
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise StaleIndexError(f"no index in {directory}")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise StaleIndexError(f"index format {meta.get('format')!r} != {FORMAT}")
        if meta.get("generation") != generation:
            raise StaleIndexError(f"index reflects generation {meta.get('generation')}, catalog is at {generation}")
        if meta.get("encoder") != encoder or meta.get("dim") != dim:
            raise StaleIndexError(f"index built with encoder {meta.get('encoder')!r}/{meta.get('dim')}, want {encoder!r}")
        for name, digest in meta["sha256"].items():
            if _sha256(directory / name) != digest:
                raise StaleIndexError(f"{name} fails its checksum")
        vectors = VectorIndex.load(directory, dim, params)
        with np.load(directory / TAGS_FILE, allow_pickle=False) as data:
            arrays = dict(data)
        tags = TagIndex.from_arrays(arrays)
        groups = GroupIndex.from_arrays(dim, arrays) if "group_names" in arrays else None
    except StaleIndexError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StaleIndexError(f"unreadable index in {directory}: {exc}") from exc
    return vectors, tags, groups
