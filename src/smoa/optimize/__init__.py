"""Self-optimisation: near-duplicate search, merge and prune policies, and `optimize_library`."""

from __future__ import annotations

from smoa.optimize.dedup import DedupResult, candidate_pairs, find_near_duplicates, union_find_groups, verify_pairs
from smoa.optimize.optimizer import OptimizationReport, optimize_library, undo_merge
from smoa.optimize.policy import AdapterFacts, MergePlan, plan_merges, select_prunable

__all__ = [
    "AdapterFacts",
    "DedupResult",
    "MergePlan",
    "OptimizationReport",
    "candidate_pairs",
    "find_near_duplicates",
    "optimize_library",
    "plan_merges",
    "select_prunable",
    "undo_merge",
    "union_find_groups",
    "verify_pairs",
]
