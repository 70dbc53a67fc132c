"""Pure scoring helpers shared by the routing strategies.

Score scale (what ``routing_threshold`` compares against; every strategy returns scores in ``[-1, 1]``,
higher is better):

============= ===================================================================================
SEMANTIC      ``cos(q, key)`` - cosine of the query embedding and the adapter's routing key
TASK_BASED    tag score in ``[0, 1]`` (idf-weighted overlap of metadata / query terms with the tags)
HYBRID        ``(1 - lam) * cos + lam * tag``; ``lam = METADATA_TAG_WEIGHT`` (0.3) when metadata named
              terms, ``TEXT_TAG_WEIGHT`` (0.1) when the terms came from the query's own words, 0 otherwise
HIERARCHICAL  ``cos(q, key)`` of adapters inside the best groups (groups chosen by centroid cosine)
============= ===================================================================================

Mixing weights are ``softmax(score / routing_temperature)`` over the kept adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

METADATA_TAG_WEIGHT = 0.3
TEXT_TAG_WEIGHT = 0.1


def softmax_weights(scores: Sequence[float], temperature: float) -> list[float]:
    """``softmax(scores / temperature)`` as plain floats summing to 1 (empty in, empty out)."""
    if not len(scores):
        return []
    if len(scores) <= 16:  # a route's k: plain floats (numpy's call overhead is most of the cost here)
        top = max(scores)
        z = [math.exp((s - top) / temperature) for s in scores]
        total = math.fsum(z)
        return [v / total for v in z]
    z = np.asarray(scores, np.float64) / temperature
    z = np.exp(z - z.max())
    return (z / z.sum()).tolist()


def fuse(cos: Mapping[int, float], tag: Mapping[int, float], lam: float) -> dict[int, float]:
    """Hybrid score ``(1 - lam) * cos + lam * tag`` over the union of keys (a missing part counts as 0)."""
    a = 1.0 - lam
    out = {k: a * c + lam * tag.get(k, 0.0) for k, c in cos.items()}
    for k in tag.keys() - cos.keys():  # tag-only keys (none where HYBRID scores both on one set)
        out[k] = a * 0.0 + lam * tag[k]
    return out


def select_top(
    scores: Mapping[int, float], k: int, threshold: float, resolve_ids: Callable[[Sequence[int]], list[str]]
) -> list[tuple[str, float]]:
    """The ``k`` best ``(adapter id, score)`` with score >= ``threshold``, best first, ties broken by id.

    Only the keys that can make the cut (score >= the k-th best score) are resolved to ids.
    """
    kept = [(key, s) for key, s in scores.items() if s >= threshold and math.isfinite(s)]
    if not kept:
        return []
    kept.sort(key=lambda kv: (-kv[1], kv[0]))
    cutoff = kept[min(k, len(kept)) - 1][1]
    finalists = [(key, s) for key, s in kept if s >= cutoff]
    ids = resolve_ids([key for key, _ in finalists])
    ranked = sorted(zip(ids, (s for _, s in finalists)), key=lambda t: (-t[1], t[0]))
    return [(i, float(s)) for i, s in ranked[:k]]
