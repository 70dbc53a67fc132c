"""Composite member graphs: flattening, cycles, materialisation against a dense weighted sum."""

from __future__ import annotations

import pytest
import torch

from smoa.adapter.weights import LoraWeights
from smoa.compose.composite import MAX_DEPTH, check_members, dependents, flatten, materialise, would_cycle
from smoa.errors import AdapterNotFoundError, CompositionError


def _graph(edges: dict[str, list[tuple[str, float]]]):  # -> members_of
    def members_of(node: str) -> list[tuple[str, float]] | None:
        if node in edges:
            return edges[node]
        if node.startswith("leaf"):
            return None
        raise AdapterNotFoundError(f"no adapter with id {node!r}")

    return members_of


def test_nested_weights_multiply_along_paths_and_sum_over_paths() -> None:
    g = _graph({"C": [("leafX", 0.5), ("D", 1.0)], "D": [("leafY", 2.0), ("leafX", 1.0)]})
    assert flatten("C", g) == [("leafX", 1.5), ("leafY", 2.0)]


def test_diamond_and_deep_chain() -> None:
    edges = {"top": [("l", 0.5), ("r", 0.5)], "l": [("leafA", 2.0)], "r": [("leafA", 4.0), ("leafB", -1.0)]}
    assert dict(flatten("top", _graph(edges))) == {"leafA": 3.0, "leafB": -0.5}
    # 30 stacked diamonds (depth 60): 2^30 paths, flattened in linear time thanks to memoisation
    chain = {f"n{i}": [(f"a{i}", 0.5), (f"b{i}", 0.5)] for i in range(30)}
    chain |= {f"a{i}": [(f"n{i + 1}", 1.0)] for i in range(30)} | {f"b{i}": [(f"n{i + 1}", 1.0)] for i in range(30)}
    chain["n30"] = [("leafZ", 3.0)]
    assert flatten("n0", _graph(chain)) == [("leafZ", pytest.approx(3.0))]


def test_leaf_root_flattens_to_itself() -> None:
    assert flatten("leaf1", _graph({})) == [("leaf1", 1.0)]


def test_cycles_are_refused_with_the_path() -> None:
    g = _graph({"A": [("leaf1", 1.0), ("B", 1.0)], "B": [("C", 1.0)], "C": [("A", 0.5)]})
    with pytest.raises(CompositionError, match="A -> B -> C -> A"):
        flatten("A", g)
    with pytest.raises(CompositionError, match="S -> S"):
        flatten("S", _graph({"S": [("S", 1.0)]}))


def test_too_deep_nesting_is_refused() -> None:
    edges = {f"n{i}": [(f"n{i + 1}", 1.0)] for i in range(MAX_DEPTH + 5)}
    edges[f"n{MAX_DEPTH + 5}"] = [("leaf", 1.0)]
    with pytest.raises(CompositionError, match="deeper"):
        flatten("n0", _graph(edges))


def test_unknown_member_error_propagates() -> None:
    with pytest.raises(AdapterNotFoundError):
        flatten("A", _graph({"A": [("ghost", 1.0)]}))


def test_would_cycle_checks_a_proposed_member_list() -> None:
    g = _graph({"A": [("B", 1.0)], "B": [("leaf1", 1.0)]})
    assert would_cycle("B", [("A", 1.0)], g)
    assert not would_cycle("B", [("leaf2", 1.0)], g)


def test_check_members() -> None:
    assert check_members([("a", 1), ("b", -0.5)]) == [("a", 1.0), ("b", -0.5)]
    for bad, fragment in [([], "at least one"), ([("a", float("inf"))], "finite"), ([("a", 1.0), ("a", 2.0)], "twice"),
                          ([("", 1.0)], "non-empty"), ([("a",)], "pair")]:  # fmt: skip
        with pytest.raises(CompositionError, match=fragment):
            check_members(bad)
    with pytest.raises(CompositionError, match="itself"):
        check_members([("me", 1.0)], composite_id="me")


def test_dependents() -> None:
    comps = [("C1", [("x", 1.0), ("y", 1.0)]), ("C2", [("y", 2.0)]), ("C3", [("z", 1.0)])]
    assert dependents("y", comps) == ["C1", "C2"]


def test_materialise_cat_equals_dense_weighted_sum() -> None:
    g = torch.Generator().manual_seed(0)
    leaves = {f"leaf{i}": LoraWeights({"m": (torch.randn(2, 12, generator=g, dtype=torch.float64),
                                             torch.randn(8, 2, generator=g, dtype=torch.float64))}, 4.0, 2)
              for i in range(3)}  # fmt: skip
    members_of = _graph({"C": [("leaf0", 0.5), ("D", 2.0)], "D": [("leaf1", 1.0), ("leaf2", -1.0)]})
    merged = materialise("C", members_of, leaves.__getitem__, method="cat")
    dense = 0.5 * leaves["leaf0"].delta("m") + 2.0 * leaves["leaf1"].delta("m") - 2.0 * leaves["leaf2"].delta("m")
    torch.testing.assert_close(merged.delta("m"), dense)
    svd2 = materialise("C", members_of, leaves.__getitem__, method="svd", rank=6)
    torch.testing.assert_close(svd2.delta("m"), dense)
