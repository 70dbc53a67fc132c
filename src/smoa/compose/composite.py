"""Composite adapters ("adapter of adapters"): a member graph flattened to weighted leaf adapters.

A COMPOSITE entry holds ``(member id, weight)`` pairs; members may be leaves (plain adapters) or composites
themselves. Its update is ``sum_k weight_k * update(member_k)``, so nesting multiplies weights along paths::

    C = 0.5 * X + 1.0 * D          D = 2.0 * Y + 1.0 * X
    flatten(C) = [(X, 0.5 + 1.0 * 1.0), (Y, 1.0 * 2.0)] = [(X, 1.5), (Y, 2.0)]

A leaf reached along several paths gets the sum of its path weights. A cycle (a composite reaching itself)
has no finite expansion and is refused with :class:`~smoa.errors.CompositionError`. The functions here take
the graph as a callable ``members_of(id) -> list[(member id, weight)] | None`` (``None`` = leaf), so they work
over any store; the library passes its catalog lookup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from smoa.adapter.weights import LoraWeights
from smoa.compose.merge import combine
from smoa.errors import CompositionError

MembersOf = Callable[[str], "list[tuple[str, float]] | None"]
MAX_DEPTH = 64


def check_members(members: Iterable[tuple[str, float]], *, composite_id: str | None = None) -> list[tuple[str, float]]:
    """Validate a composite's member list: non-empty, ``(str id, finite weight)`` pairs, no repeats, not itself.

    Returns:
        The members as a list of ``(str, float)``.

    Raises:
        CompositionError: naming the first bad entry.
    """
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, item in enumerate(members):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise CompositionError(f"`members`[{i}] must be a (member id, weight) pair, got {item!r}")
        mid, w = item
        if not isinstance(mid, str) or not mid:
            raise CompositionError(f"`members`[{i}]: member id must be a non-empty string, got {mid!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise CompositionError(f"`members`[{i}]: weight of {mid!r} must be a finite number, got {w!r}")
        if mid in seen:
            raise CompositionError(f"`members`[{i}]: member {mid!r} is listed twice")
        if composite_id is not None and mid == composite_id:
            raise CompositionError(f"`members`[{i}]: composite {composite_id!r} cannot contain itself")
        seen.add(mid)
        out.append((mid, float(w)))
    if not out:
        raise CompositionError("`members` must hold at least one (member id, weight) pair, got none")
    return out


def flatten(root_id: str, members_of: MembersOf) -> list[tuple[str, float]]:
    """Leaf adapters of ``root_id`` with their total weights (products along paths, summed over paths).

    Args:
        root_id: a composite or a leaf (a leaf flattens to ``[(root_id, 1.0)]``).
        members_of: ``id -> [(member id, weight), ...]`` for composites, ``None`` for leaves; may raise for
            unknown ids (the error propagates).

    Returns:
        ``[(leaf id, weight)]`` in depth-first order of first appearance.

    Raises:
        CompositionError: a cycle (the path is named) or nesting deeper than :data:`MAX_DEPTH`.
    """
    cache: dict[str, list[tuple[str, float]] | None] = {}
    memo: dict[str, dict[str, float]] = {}  # expansion of each composite seen (the graph is a DAG once checked)

    def lookup(node: str) -> list[tuple[str, float]] | None:
        if node not in cache:
            cache[node] = members_of(node)
        return cache[node]

    def expand(node: str, path: list[str]) -> dict[str, float]:
        members = lookup(node)
        if members is None:
            return {node: 1.0}
        if node in memo:
            return memo[node]
        if len(path) > MAX_DEPTH:
            raise CompositionError(f"composite {root_id!r} nests deeper than {MAX_DEPTH} levels")
        totals: dict[str, float] = {}
        for child, w in members:
            if child in path:
                cycle = " -> ".join([*path[path.index(child) :], child])
                raise CompositionError(f"composite cycle: {cycle}")
            for leaf, lw in expand(child, [*path, child]).items():
                totals[leaf] = totals.get(leaf, 0.0) + float(w) * lw
        memo[node] = totals
        return totals

    return list(expand(root_id, [root_id]).items())


def would_cycle(composite_id: str, members: Sequence[tuple[str, float]], members_of: MembersOf) -> bool:
    """Whether giving ``composite_id`` these ``members`` would create a cycle (check before storing an update)."""

    def patched(node: str) -> list[tuple[str, float]] | None:
        return list(members) if node == composite_id else members_of(node)

    try:
        flatten(composite_id, patched)
    except CompositionError as exc:
        if str(exc).startswith("composite cycle"):
            return True
        raise
    return False


def dependents(member_id: str, composites: Iterable[tuple[str, Sequence[tuple[str, float]]]]) -> list[str]:
    """Ids of the composites that list ``member_id`` directly (deleting it would break them)."""
    return [cid for cid, members in composites if any(mid == member_id for mid, _ in members)]


def materialise(
    root_id: str,
    members_of: MembersOf,
    weights_of: Callable[[str], LoraWeights],
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
) -> LoraWeights:
    """A plain adapter equal to (``cat``, exact) or approximating the composite's update.

    Args:
        root_id: the composite.
        members_of: the member graph, as for :func:`flatten`.
        weights_of: ``leaf id -> LoraWeights``.
        method, rank, density, seed: as :func:`smoa.compose.merge.combine`.
    """
    leaves = flatten(root_id, members_of)
    return combine([weights_of(lid) for lid, _ in leaves], [w for _, w in leaves], method, rank, density, seed)
