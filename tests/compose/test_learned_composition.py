"""Gradient-free composition weights (LoraHub) on synthetic losses with a known optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoa.adapter.weights import LoraWeights
from smoa.compose.learned import compose_from_examples, search_weights
from smoa.compose.merge import combine
from smoa.errors import CompositionError


def test_finds_better_than_uniform_weights_for_a_least_squares_mixture() -> None:
    # Members are real LoRA updates; the "examples" are (x, y) pairs produced by a hidden mixture of them.
    g = torch.Generator().manual_seed(0)
    members = [LoraWeights({"m": (torch.randn(2, 10, generator=g), torch.randn(6, 2, generator=g))}, 4.0, 2)
               for _ in range(4)]  # fmt: skip
    hidden = [1.0, -0.5, 0.0, 0.3]
    x = torch.randn(32, 10, generator=g)
    y = x @ combine(members, hidden, "cat").delta("m").T
    examples = list(zip(x, y))
    calls: list[int] = []

    def loss_fn(weights: list[float], exs: list) -> float:
        calls.append(len(exs))
        mixed = combine(members, weights, "cat").delta("m")
        return float(sum(((mixed @ xi - yi) ** 2).mean() for xi, yi in exs) / len(exs))

    result = compose_from_examples([f"ad_{i}" for i in range(4)], examples, loss_fn, budget=80, seed=1)
    assert result.evaluations == 80 == len(calls) and set(calls) == {32}
    assert result.history[0][0] == [0.25] * 4  # uniform start evaluated first
    assert result.loss < 0.1 * result.uniform_loss
    assert np.allclose(result.weights, hidden, atol=0.2)
    assert result.members[0][0] == "ad_0"


def test_never_worse_than_the_start_even_with_a_tiny_budget() -> None:
    def loss(w: list[float]) -> float:
        return float(np.sum((np.array(w) - 0.25) ** 2))  # the uniform start is the optimum

    weights, best, history = search_weights(4, loss, budget=3, l1=0.0)
    assert best == pytest.approx(0.0) and weights == [0.25] * 4 and len(history) == 3


def test_bad_arguments() -> None:
    with pytest.raises(CompositionError, match="`ids`"):
        compose_from_examples(["a", "a"], [1], lambda w, e: 0.0)
    with pytest.raises(CompositionError, match="`examples`"):
        compose_from_examples(["a"], [], lambda w, e: 0.0)
    with pytest.raises(CompositionError, match="`budget`"):
        search_weights(2, lambda w: 0.0, budget=0)
    with pytest.raises(CompositionError, match="`bounds`"):
        search_weights(2, lambda w: 0.0, bounds=(1.0, -1.0))
    with pytest.raises(CompositionError, match="non-finite"):
        search_weights(2, lambda w: float("nan"))
