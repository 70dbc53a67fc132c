"""`optimize_library`: merge near-duplicate adapters and prune idle ones, with a report.

::

    catalog facts ──► sketches of active adapters ──► dedup (ANN + exact verify) ──► merge plans (policy)
                                                                                         │
          report ◄── prune (archive / delete idle adapters) ◄── merged adapters + aliases ◄┘

Works on the library core (:class:`~smoa.core.LibraryCore`; the facade passes its ``core``): every change is one
core mutation, so routes and caches follow at once. Merging loads each candidate's weights once to sketch it
(linear in the library) and again only for verified candidates.

Adapters deleted, archived or merged by someone else while a run is under way are skipped, never an error: the
run works on a snapshot of the catalog and each change re-checks its adapters under the core's lock.

Merges are recorded by ``LibraryCore.merge`` (the merged adapter and the merge record — sources -> status
``"merged"``, weights kept in cold storage for undo, alias ``source -> merged`` — under one lock) and undone by
``LibraryCore.undo_merge`` (everything or nothing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from smoa.adapter.weights import LoraWeights
from smoa.compose.merge import combine_mean, merge_error
from smoa.compose.similarity import DEFAULT_SKETCH_DIM, cosine, sketch_batch, stack_weights
from smoa.errors import AdapterNotFoundError, CompositionError, InvalidInputError
from smoa.optimize.dedup import find_near_duplicates
from smoa.optimize.policy import AdapterFacts, MergePlan, mergeable, plan_merges, select_prunable

if TYPE_CHECKING:
    from smoa.core import LibraryCore

_SKETCH_BATCH = 2048


@dataclass
class OptimizationReport:
    """What :func:`optimize_library` did (or, with ``dry_run``, would do).

    Attributes:
        groups_merged: source ids of each merge performed.
        merged_into: the new adapter id of each merge (``""`` in a dry run).
        merge_ids: the library's merge record ids (for undo; ``-1`` when not recorded).
        merge_errors: relative error of each merged update vs the members' mean update.
        skipped_groups: groups whose merge error exceeded ``max_merge_error``.
        archived, deleted: pruned ids.
        bytes_freed: hot-storage bytes freed (merged sources minus merged adapters, plus pruned weights).
        adapters_scanned: adapters sketched for near-duplicate search.
        candidates: candidate pairs verified exactly.
        seconds: wall time.
        timings: seconds per stage.
        dry_run: nothing was changed.
    """

    groups_merged: list[list[str]] = field(default_factory=list)
    merged_into: list[str] = field(default_factory=list)
    merge_ids: list[int] = field(default_factory=list)
    merge_errors: list[float] = field(default_factory=list)
    skipped_groups: list[list[str]] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    adapters_scanned: int = 0
    candidates: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False


def optimize_library(
    core: LibraryCore,
    *,
    merge: bool | None = None,
    prune: bool | None = None,
    threshold: float | None = None,
    method: str | None = None,
    prune_after_queries: int | None = None,
    prune_after_seconds: float | None = None,
    prune_action: str | None = None,
    max_merge_error: float = 0.2,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    neighbours: int = 10,
    now: float | None = None,
    dry_run: bool = False,
) -> OptimizationReport:
    """Merge near-duplicates, then prune idle adapters; every ``None`` argument comes from the config.

    Args:
        core: the library core (``smoa.core`` of the facade).
        merge, prune: run each stage (defaults ``enable_auto_merging`` / ``enable_auto_pruning``).
        threshold: exact update cosine for near-duplicates (``merge_similarity_threshold``).
        method: merge method (``merge_method``).
        prune_after_queries, prune_after_seconds, prune_action: the prune policy (config fields of these names).
        max_merge_error: a group whose merged update is further than this (relative Frobenius error) from the
            members' mean update is left alone.
        sketch_dim, neighbours: near-duplicate search settings.
        now: the time used by the prune policy (default ``time.time()``).
        dry_run: decide and report, change nothing.
    """
    t0 = time.perf_counter()
    from smoa.core import LibraryCore

    if not isinstance(core, LibraryCore):
        raise InvalidInputError(f"`core` must be a LibraryCore (the facade's `.core`), got {type(core).__name__}")
    lib = core
    cfg = lib.config
    merge = cfg.enable_auto_merging if merge is None else merge
    prune = cfg.enable_auto_pruning if prune is None else prune
    threshold = cfg.merge_similarity_threshold if threshold is None else threshold
    method = cfg.merge_method if method is None else method
    action = cfg.prune_action if prune_action is None else prune_action
    if action not in ("archive", "delete"):
        raise InvalidInputError(f"`prune_action` must be 'archive' or 'delete', got {action!r}")
    report = OptimizationReport(dry_run=dry_run)
    lib.flush_usage()
    facts = collect_facts(lib)
    touched: set[str] = set()
    if merge:
        t = time.perf_counter()
        groups = near_duplicate_groups(lib, facts, threshold, sketch_dim, neighbours, report)
        report.timings["dedup"] = time.perf_counter() - t
        t = time.perf_counter()
        for plan in plan_merges(groups, facts, method):
            _merge_one(lib, plan, max_merge_error, dry_run, report)
            touched.update(plan.sources)
        touched.update(report.merged_into)
        report.timings["merge"] = time.perf_counter() - t
    if prune:
        t = time.perf_counter()
        protected = composite_members(facts.values(), lib) | touched
        ids = select_prunable(
            facts.values(), now=time.time() if now is None else now, queries=int(lib.queries),
            after_queries=cfg.prune_after_queries if prune_after_queries is None else prune_after_queries,
            after_seconds=cfg.prune_after_seconds if prune_after_seconds is None else prune_after_seconds,
            protected=protected,
        )  # fmt: skip
        _prune(lib, ids, action, facts, dry_run, report)
        report.timings["prune"] = time.perf_counter() - t
    if not dry_run:  # learned routing keys refit against the library as it is now (issue 11)
        t = time.perf_counter()
        lib.refit_routing()
        report.timings["refit"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------------------------
# reading the library
# ---------------------------------------------------------------------------------------------------------------
def collect_facts(lib: LibraryCore) -> dict[str, AdapterFacts]:
    """:class:`AdapterFacts` of every active and archived adapter (catalog reads only, no weights)."""
    usage = {row[0]: row for row in lib.catalog.usage_rows()}  # id -> (id, count, last_at, last_query, ...)
    out: dict[str, AdapterFacts] = {}
    for ad in lib.iter_adapters(("active", "archived")):
        row = usage.get(ad.id)
        last_query = int(row[3]) if row is not None and ad.usage_count > 0 else None
        created_query = ad.created_query
        out[ad.id] = AdapterFacts(
            id=ad.id, profile=ad.profile, status=ad.status, pinned=ad.pinned, is_composite=ad.is_composite,
            created_at=ad.created_at, last_used_at=ad.last_used_at, usage_count=ad.usage_count,
            last_used_query=last_query, created_query=created_query, nbytes=int(row[7]) if row is not None else 0,
            specialization=ad.specialization.value, description=ad.description,
            domain_tags=tuple(ad.domain_tags), skill_tags=tuple(ad.skill_tags),
        )  # fmt: skip
    return out


def composite_members(facts: Any, lib: LibraryCore) -> set[str]:
    """Ids listed (after alias resolution) as members of any composite adapter."""
    out: set[str] = set()
    for f in facts:
        if f.is_composite:
            try:
                out.update(lib.resolve(mid) for mid, _ in lib.get_adapter(f.id).members)
            except AdapterNotFoundError:
                continue
    return out


def iter_weight_batches(
    lib: LibraryCore, ids: Sequence[str], batch: int = _SKETCH_BATCH
) -> Iterator[tuple[list[str], list[LoraWeights]]]:
    """Weights of ``ids`` in batches, read past the cache (a library-wide scan must not evict the working set);
    adapters deleted meanwhile are left out of their batch."""
    for s in range(0, len(ids), batch):
        got: list[tuple[str, LoraWeights]] = []
        for aid in ids[s : s + batch]:
            try:
                got.extend(lib.iter_weights([aid]))
            except AdapterNotFoundError:
                continue
        yield [a for a, _ in got], [w for _, w in got]


def near_duplicate_groups(
    lib: LibraryCore, facts: dict[str, AdapterFacts], threshold: float, dim: int, neighbours: int,
    report: OptimizationReport,
) -> list[list[str]]:  # fmt: skip
    """Near-duplicate groups (ids) among mergeable adapters: sketch, ANN search, exact verification."""
    wanted = [i for i, f in facts.items() if mergeable(f)]
    report.adapters_scanned = len(wanted)
    if len(wanted) < 2:
        return []
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for chunk, weights in iter_weight_batches(lib, wanted):
        sk = np.zeros((len(chunk), dim), np.float32)
        for sig_rows in _by_signature(weights).values():
            sk[sig_rows] = sketch_batch(stack_weights([weights[r] for r in sig_rows]), lib.profile, dim)
        ids += chunk
        parts.append(sk)
    if len(ids) < 2:
        return []
    sketches = np.concatenate(parts)
    cache: dict[str, LoraWeights | None] = {}

    def load(i: str) -> LoraWeights | None:
        if i not in cache:
            try:
                cache[i] = lib.get_weights(i)
            except AdapterNotFoundError:  # deleted while the run goes on: never a duplicate of anything
                cache[i] = None
        return cache[i]

    def score(a: int, b: int) -> float:
        wa, wb = load(ids[a]), load(ids[b])
        return cosine(wa, wb) if wa is not None and wb is not None else 0.0

    def scorer(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.array([score(a, b) for a, b in zip(left, right)])

    partition = np.array([facts[i].profile for i in ids])
    result = find_near_duplicates(sketches, scorer, threshold, partition=partition, neighbours=neighbours)
    report.candidates = result.candidates
    return [[ids[r] for r in g] for g in result.groups]


def _by_signature(weights: Sequence[LoraWeights]) -> dict[tuple[Any, ...], list[int]]:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for r, w in enumerate(weights):
        groups.setdefault((tuple(sorted(w.factors)), w.rank, next(iter(w.factors.values()))[0].dtype), []).append(r)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# changing the library
# ---------------------------------------------------------------------------------------------------------------
def _merge_one(lib: LibraryCore, plan: MergePlan, max_error: float, dry_run: bool, report: OptimizationReport) -> None:
    try:
        members = [lib.get_weights(s) for s in plan.sources]
    except AdapterNotFoundError:  # a source was deleted meanwhile: leave the group alone
        report.skipped_groups.append(list(plan.sources))
        return
    rank = max(w.rank for w in members) if plan.method == "svd" else None
    merged = combine_mean(members, plan.method, rank=rank)  # plan.weights are the mean weights 1/n
    err = merge_error(members, plan.weights, merged)
    if err > max_error:
        report.skipped_groups.append(list(plan.sources))
        return
    if dry_run:
        report.groups_merged.append(list(plan.sources))
        report.merge_errors.append(err)
        report.merged_into.append("")
        report.merge_ids.append(-1)
        report.bytes_freed += plan.source_bytes - len(merged.to_bytes())
        return
    from smoa.adapter.spec import AdapterSpec

    spec = AdapterSpec(
        specialization=plan.specialization, domain_tags=plan.domain_tags[:64], skill_tags=plan.skill_tags[:64],
        description=plan.description, weights=merged, alpha=merged.alpha,
        metadata={"merged_from": plan.sources, "merge_method": plan.method, "merge_error": err},
    )  # fmt: skip
    try:
        new, merge_id = lib.merge(plan.sources, spec, plan.method)
    except (AdapterNotFoundError, CompositionError):  # changed by someone else meanwhile: nothing was merged
        report.skipped_groups.append(list(plan.sources))
        return
    report.groups_merged.append(list(plan.sources))
    report.merge_errors.append(err)
    report.merged_into.append(new.id)
    report.merge_ids.append(merge_id)
    report.bytes_freed += plan.source_bytes - len(merged.to_bytes())


def undo_merge(core: LibraryCore, merge_id: int) -> list[str]:
    """Undo a merge recorded by :func:`optimize_library`: sources active again, merged adapter deleted —
    everything or nothing.

    Args:
        core: the library core.
        merge_id: from :attr:`OptimizationReport.merge_ids`.

    Returns:
        The restored source ids.

    Raises:
        InvalidInputError: unknown or already undone ``merge_id``.
    """
    return core.undo_merge(merge_id)


def _prune(lib: LibraryCore, ids: list[str], action: str, facts: dict[str, AdapterFacts], dry_run: bool,
           report: OptimizationReport) -> None:  # fmt: skip
    if dry_run:
        for aid in ids:
            report.bytes_freed += facts[aid].nbytes
            (report.archived if action == "archive" else report.deleted).append(aid)
        return
    for aid, freed in lib.prune(ids, action):
        if action == "archive":
            report.bytes_freed += freed
            report.archived.append(aid)
        else:
            report.bytes_freed += facts[aid].nbytes if aid in facts else 0
            report.deleted.append(aid)
