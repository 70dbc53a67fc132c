"""Merge and prune policies, one rule at a time."""

from __future__ import annotations

import pytest

from smoa.errors import InvalidInputError
from smoa.optimize.policy import AdapterFacts, plan_merges, select_prunable, union_tags

DAY = 24 * 3600.0


def test_union_tags_keeps_first_seen_order() -> None:
    assert union_tags([["a", "b"], ["b", "c"], [], ["a", "d"]]) == ["a", "b", "c", "d"]


def test_plan_merges_unions_tags_and_leads_with_the_most_used() -> None:
    facts = {
        "x": AdapterFacts("x", profile="p", usage_count=3, description="x-desc", domain_tags=("med",), skill_tags=("dx",), nbytes=100),
        "y": AdapterFacts("y", profile="p", usage_count=9, description="y-desc", specialization="domain",
                          domain_tags=("med", "radiology"), nbytes=100),
        "z": AdapterFacts("z", profile="p", usage_count=1, skill_tags=("dx", "triage"), nbytes=100),
    }  # fmt: skip
    (plan,) = plan_merges([["x", "y", "z"]], facts, "svd")
    assert plan.sources == ["y", "x", "z"] and plan.weights == pytest.approx([1 / 3] * 3)
    assert plan.domain_tags == ["med", "radiology"] and plan.skill_tags == ["dx", "triage"]
    assert plan.description == "y-desc" and plan.specialization == "domain"
    assert plan.usage_count == 13 and plan.source_bytes == 300 and plan.method == "svd"


def test_pinned_archived_and_composite_members_are_not_merged() -> None:
    facts = {
        "a": AdapterFacts("a", profile="p"),
        "b": AdapterFacts("b", profile="p", pinned=True),
        "c": AdapterFacts("c", profile="p", status="archived"),
        "d": AdapterFacts("d", profile="p", is_composite=True),
        "e": AdapterFacts("e", profile="p"),
    }
    assert plan_merges([["a", "b", "c", "d"]], facts, "svd") == []  # one mergeable member left
    assert [p.sources for p in plan_merges([["a", "b", "e"]], facts, "svd")] == [["a", "e"]]


def test_groups_spanning_profiles_are_refused() -> None:
    facts = {"a": AdapterFacts("a", profile="p"), "b": AdapterFacts("b", profile="q")}
    with pytest.raises(InvalidInputError, match="profiles"):
        plan_merges([["a", "b"]], facts, "svd")


def test_prune_by_time_since_last_use_or_creation() -> None:
    now = 100 * DAY
    facts = [
        AdapterFacts("old-unused", created_at=0.0),
        AdapterFacts("new-unused", created_at=now - DAY),
        AdapterFacts("used-recently", created_at=0.0, last_used_at=now - DAY, usage_count=5),
        AdapterFacts("used-long-ago", created_at=0.0, last_used_at=now - 40 * DAY, usage_count=5),
        AdapterFacts("pinned", created_at=0.0, pinned=True),
        AdapterFacts("archived", created_at=0.0, status="archived"),
        AdapterFacts("composite", created_at=0.0, is_composite=True),
        AdapterFacts("member", created_at=0.0),
    ]
    got = select_prunable(facts, now=now, queries=0, after_queries=10**9, after_seconds=30 * DAY, protected={"member"})
    assert got == ["old-unused", "used-long-ago"]


def test_prune_by_queries_needs_a_query_mark() -> None:
    facts = [
        AdapterFacts("used-long-ago", created_at=0.0, last_used_at=99.0, usage_count=1, last_used_query=10),
        AdapterFacts("used-recently", created_at=0.0, last_used_at=99.0, usage_count=1, last_used_query=990),
        AdapterFacts("never-used-mark-known", created_at=0.0, created_query=100),
        AdapterFacts("never-used-no-mark", created_at=0.0),  # created after many queries? unknown: time only
    ]
    got = select_prunable(facts, now=100.0, queries=1000, after_queries=500, after_seconds=1e9)
    assert got == ["used-long-ago", "never-used-mark-known"]


def test_prune_arguments_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="prune_after_queries"):
        select_prunable([], now=0.0, queries=0, after_queries=0, after_seconds=1.0)
