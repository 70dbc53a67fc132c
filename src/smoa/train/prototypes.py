"""Several routing keys for one adapter: prototypes of its examples, added as COMPOSITE aliases.

One key per adapter is the centroid of its examples; for a broad domain (all of business news) the centroid is
far from each single text (cosine ~0.35 with MiniLM on news), and a distractor described by a few on-topic words
("insurance analysis") can sit closer to the query. Clustering the examples and giving each cluster its own key
fixes that without changing the router: each prototype is a COMPOSITE entry whose only member is the adapter
(weight 1), routed by the cluster's examples, and flattened back to the adapter when a route is applied::

    examples ──encode──► k-means (cosine, m clusters) ──► m COMPOSITE aliases [(adapter, 1.0)]
                                                          key_j = blend(tags text, centroid of cluster j)

On the main job (5 BBC topics + 5,000 distractors) 8 prototypes lift top-1 routing from ~0.77 to ~0.87
(``docs/bench_main_job.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from smoa.errors import InvalidInputError

if TYPE_CHECKING:
    from smoa.adapter.spec import Adapter
    from smoa.mixture import SparseAdapterMixture


def spherical_kmeans(x: np.ndarray, m: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Cluster unit rows by cosine (k-means on the sphere).

    Args:
        x: float32 ``[n, d]`` unit rows.
        m: clusters (at most ``n``).
        seed: picks the initial centres (``m`` distinct rows).
        iters: Lloyd iterations.

    Returns:
        int ``[n]`` cluster of each row, clusters numbered ``0..m-1`` by first appearance; no cluster is empty.
    """
    n = len(x)
    if not 1 <= m <= n:
        raise InvalidInputError(f"`m` must be in [1, {n}] (number of examples), got {m!r}")
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(n, m, replace=False)].astype(np.float64)
    assign = np.zeros(n, np.int64)
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)  # [n]
        for j in range(m):
            members = x[assign == j]
            if len(members) == 0:  # re-seed an empty cluster with the worst-served row
                members = x[[int((x @ centres.T).max(1).argmin())]]
            s = members.sum(0)
            centres[j] = s / max(np.linalg.norm(s), 1e-12)
    assign = (x @ centres.T).argmax(1)
    _, first = np.unique(assign, return_index=True)
    order = {int(assign[i]): rank for rank, i in enumerate(sorted(first))}
    return np.array([order[int(a)] for a in assign], np.int64)


def example_key(smoa: SparseAdapterMixture, adapter: Adapter, vectors: np.ndarray) -> np.ndarray:
    """The key :meth:`Router.routing_keys` gives ``adapter`` with examples embedded as ``vectors`` ``[n, dim]``:
    ``normalise(TEXT_WEIGHT * e(tags + description) + (1 - TEXT_WEIGHT) * unit mean of vectors)``, float32 ``[dim]``."""
    from smoa.routing.keys import TEXT_WEIGHT, blend_keys, example_centroids, routing_text

    text = smoa.router.encoder.encode([routing_text(adapter.domain_tags, adapter.skill_tags, adapter.description)])
    cent = example_centroids(np.asarray(vectors, np.float32), np.zeros(len(vectors), np.int64), 1)
    return blend_keys(text, cent, np.ones(1, bool), TEXT_WEIGHT)[0]


def add_routing_prototypes(
    smoa: SparseAdapterMixture, adapter_id: str, examples: Sequence[str], m: int = 8, seed: int = 0,
    vectors: np.ndarray | None = None, multi_vector: bool = False,
) -> list[Any]:  # fmt: skip
    """Give ``adapter_id`` ``m`` extra routing keys, one per cluster of ``examples``.

    Args:
        smoa: the :class:`~smoa.mixture.SparseAdapterMixture`.
        adapter_id: a plain (non-composite) adapter.
        examples: texts like the queries it should serve (e.g. its training inputs).
        m: prototypes (clusters); capped at ``len(examples)``.
        seed: k-means seed.
        vectors: the examples already encoded by ``smoa.router.encoder`` (``[n, dim]``), to encode them once.
        multi_vector: store the prototypes as extra keys of the adapter itself (``[1 + m, dim]`` via
            ``LibraryCore.set_routing_keys``; needs the router's multi-vector index, issue 11) instead of as
            COMPOSITE alias entries.

    Returns:
        The COMPOSITE alias adapters (each ``members == [(adapter_id, 1.0)]``, same tags and description,
        ``metadata["prototype_of"] = adapter_id``), each keyed like an adapter whose examples are its cluster;
        ``[]`` with ``multi_vector``.
    """
    from smoa.adapter.spec import AdapterSpec

    texts = [e for e in examples if isinstance(e, str) and e.strip()]
    if not texts or (vectors is not None and len(vectors) != len(texts)):
        raise InvalidInputError(f"`examples` must hold non-empty texts (and `vectors` one row each), got {len(texts)}")
    core = smoa.core
    ad = core.get_adapter(adapter_id)
    vecs = smoa.router.encoder.encode_batch(texts) if vectors is None else np.asarray(vectors, np.float32)
    labels = spherical_kmeans(vecs, min(m, len(texts)), seed=seed)
    n = int(labels.max()) + 1
    keys = [example_key(smoa, ad, vecs[labels == j]) for j in range(n)]
    if multi_vector:
        core.set_routing_keys(ad.id, np.stack([example_key(smoa, ad, vecs), *keys]))
        return []
    specs = [
        AdapterSpec(specialization="composite", domain_tags=list(ad.domain_tags), skill_tags=list(ad.skill_tags),
                    description=ad.description, members=[(ad.id, 1.0)], metadata={"prototype_of": ad.id, "prototype": j})
        for j in range(n)
    ]  # fmt: skip
    aliases = core.create_many(specs)
    for alias, key in zip(aliases, keys):
        core.set_routing_keys(alias.id, key)
    return aliases


__all__ = ["add_routing_prototypes", "example_key", "spherical_kmeans"]
