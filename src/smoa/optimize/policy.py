"""Merge and prune policies: pure decisions over per-adapter facts (no I/O, no library).

Merge policy. A group of near-duplicates (exact update cosine >= ``merge_similarity_threshold``, one profile,
found by :mod:`smoa.optimize.dedup`) becomes one adapter: the members' mean update merged with
``merge_method``; domain and skill tags unioned (first-seen order); the most used member's description and
specialization kept; usage counts summed. Pinned, archived and composite adapters are never merged (a pinned
adapter is one a user asked to keep as it is). The old ids become aliases of the merged one, and the plan is
recorded so the merge can be undone — both done by the library.

Prune policy. An adapter is prunable when it is active, not pinned, not a COMPOSITE member, and idle:

    seconds since last use (or creation, if never used)  >= prune_after_seconds
    or  library queries since last use (or creation)     >= prune_after_queries

The query criterion needs the library's query counter at the adapter's last use or creation; when neither is
known (never used, creation counter not recorded) only the time criterion applies, so a new adapter is never
pruned just because the library has served many queries before it existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from smoa.errors import InvalidInputError


@dataclass(frozen=True)
class AdapterFacts:
    """What the policies read about one adapter.

    Attributes:
        id: adapter id.
        profile: base-model profile fingerprint.
        status: ``"active"``, ``"archived"`` or ``"merged"``.
        pinned: protected from pruning and merging.
        is_composite: a COMPOSITE entry (never merged or pruned here).
        created_at: creation time (Unix seconds).
        last_used_at: last use (Unix seconds) or ``None``.
        usage_count: uses so far.
        last_used_query: library query counter at the last use, or ``None`` if never used.
        created_query: library query counter at creation, or ``None`` if not recorded.
        nbytes: stored weight bytes.
        specialization: specialization value (kept from the most used member on merge).
        description: free text.
        domain_tags, skill_tags: routing tags.
    """

    id: str
    profile: str = ""
    status: str = "active"
    pinned: bool = False
    is_composite: bool = False
    created_at: float = 0.0
    last_used_at: float | None = None
    usage_count: int = 0
    last_used_query: int | None = None
    created_query: int | None = None
    nbytes: int = 0
    specialization: str = "custom"
    description: str = ""
    domain_tags: tuple[str, ...] = ()
    skill_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergePlan:
    """One merge to perform.

    Attributes:
        sources: member ids, most used first (ties: input order).
        weights: mean weights ``1/n``.
        method: merge method (:data:`smoa.compose.merge.METHODS`).
        domain_tags, skill_tags: unions, first-seen order.
        description, specialization: from the most used member.
        usage_count: summed usage.
        source_bytes: summed stored bytes of the sources.
    """

    sources: list[str]
    weights: list[float]
    method: str
    domain_tags: list[str] = field(default_factory=list)
    skill_tags: list[str] = field(default_factory=list)
    description: str = ""
    specialization: str = "custom"
    usage_count: int = 0
    source_bytes: int = 0


def union_tags(lists: Iterable[Sequence[str]]) -> list[str]:
    """Concatenate tag lists, dropping repeats, keeping first-seen order."""
    seen: dict[str, None] = {}
    for tags in lists:
        for t in tags:
            seen.setdefault(t, None)
    return list(seen)


def mergeable(f: AdapterFacts) -> bool:
    """Active, unpinned, non-composite adapters may be merged."""
    return f.status == "active" and not f.pinned and not f.is_composite


def plan_merges(groups: Iterable[Sequence[str]], facts: Mapping[str, AdapterFacts], method: str) -> list[MergePlan]:
    """Turn near-duplicate groups into merge plans (non-mergeable members dropped, mixed profiles refused).

    Raises:
        InvalidInputError: a group spans several profiles (dedup must partition by profile).
    """
    plans: list[MergePlan] = []
    for group in groups:
        members = [facts[i] for i in group if mergeable(facts[i])]
        if len(members) < 2:
            continue
        profiles = {f.profile for f in members}
        if len(profiles) != 1:
            raise InvalidInputError(f"group {[f.id for f in members]} spans profiles {sorted(profiles)}; not mergeable")
        members.sort(key=lambda f: -f.usage_count)  # stable: ties keep input order
        head = members[0]
        plans.append(
            MergePlan(
                sources=[f.id for f in members],
                weights=[1.0 / len(members)] * len(members),
                method=method,
                domain_tags=union_tags(f.domain_tags for f in members),
                skill_tags=union_tags(f.skill_tags for f in members),
                description=head.description,
                specialization=head.specialization,
                usage_count=sum(f.usage_count for f in members),
                source_bytes=sum(f.nbytes for f in members),
            )
        )
    return plans


def idle(f: AdapterFacts, *, now: float, queries: int, after_queries: int, after_seconds: float) -> bool:
    """Whether ``f`` has been unused for ``after_seconds`` or for ``after_queries`` library queries."""
    since = f.last_used_at if f.last_used_at is not None else f.created_at
    if now - since >= after_seconds:
        return True
    mark = f.last_used_query if f.last_used_query is not None else f.created_query
    return mark is not None and queries - mark >= after_queries


def select_prunable(
    facts: Iterable[AdapterFacts],
    *,
    now: float,
    queries: int,
    after_queries: int,
    after_seconds: float,
    protected: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """Ids to prune: active, not pinned, not composite, not in ``protected`` (e.g. composite members), idle."""
    if after_queries < 1 or after_seconds < 0:
        raise InvalidInputError(
            "`prune_after_queries` must be >= 1 and `prune_after_seconds` >= 0, "
            f"got {after_queries!r} and {after_seconds!r}"
        )
    return [
        f.id
        for f in facts
        if f.status == "active" and not f.pinned and not f.is_composite and f.id not in protected
        and idle(f, now=now, queries=queries, after_queries=after_queries, after_seconds=after_seconds)
    ]  # fmt: skip
