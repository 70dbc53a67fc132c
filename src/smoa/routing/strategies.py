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

import heapq
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

METADATA_TAG_WEIGHT = 0.3
TEXT_TAG_WEIGHT = 0.1
CONTENDER_SLACK = 1e-9  # contenders: a key is set aside only when it trails by this much more than its tags can make up


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


def contenders(cos: Mapping[int, float], k: int, lam: float, drop: Collection[int] = ()) -> list[int] | None:
    """The keys of ``cos`` (less ``drop``) whose :func:`fuse` score can still be among the ``k`` best, or ``None``
    where no bound applies (``lam`` outside ``[0, 1)``, at most ``k`` finite cosines).

    A tag score lies in ``[0, 1]``, so a key fuses to at most ``(1 - lam) * cos + lam``, and each of the ``k`` keys
    with the best cosines fuses to at least ``(1 - lam) * cos``. A key whose cosine trails the ``k``-th best by more
    than ``lam / (1 - lam)`` is beaten by ``k`` others whatever its tags: it need not be tag-scored nor fused, and the
    ``k`` best fused scores (what :func:`select_top` keeps, at any threshold) are the same, float for float.
    """
    a = 1.0 - lam
    if not 0.0 <= lam < 1.0 or len(cos) <= k:
        return None
    # select_top keeps finite scores only, and a NaN would leave nlargest's order undefined
    vals = [c for key, c in cos.items() if -math.inf < c < math.inf and key not in drop]
    if len(vals) <= k:
        return None
    bar = a * heapq.nlargest(k, vals)[-1] - lam - CONTENDER_SLACK
    return [key for key, c in cos.items() if a * c >= bar and key not in drop]


def select_top(
    scores: Mapping[int, float], k: int, threshold: float, resolve_ids: Callable[[Sequence[int]], list[str]]
) -> list[tuple[str, float]]:
    """The ``k`` best ``(adapter id, score)`` with score >= ``threshold``, best first, ties broken by id.

    Only the keys that can make the cut (score >= the k-th best score) are resolved to ids.
    """
    kept = [s for s in scores.values() if -math.inf < s < math.inf and s >= threshold]  # NaN fails every test
    if not kept:
        return []
    cutoff = heapq.nlargest(k, kept)[-1] if len(kept) > k else min(kept)  # the k-th best score (no full sort)
    finalists = [(key, s) for key, s in scores.items() if s >= cutoff and s < math.inf]
    ids = resolve_ids([key for key, _ in finalists])
    ranked = sorted(zip(ids, (s for _, s in finalists)), key=lambda t: (-t[1], t[0]))
    return [(i, float(s)) for i, s in ranked[:k]]
