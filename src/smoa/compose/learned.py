"""Learned composition weights from a few examples (LoraHub's idea: gradient-free search).

Given member adapters ``ids`` and a loss on a handful of examples, find weights ``w`` minimising::

    objective(w) = loss(sum_k w_k * update_k ; examples) + l1 * mean_k |w_k|

with a derivative-free optimiser (``nevergrad``'s ``NGOpt`` by default, as LoraHub) inside ``bounds``. The
search starts from uniform weights ``1/n`` and the uniform point is always evaluated, so the returned weights
are never worse on the objective than uniform mixing. The loss is a callable, so the search needs no model:
the facade wires it to the inference engine (mix the members with ``w``, run the examples, return the mean
token loss).

Reference: Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition" (2023).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smoa.errors import CompositionError

Objective = Callable[[list[float]], float]


@dataclass
class LearnedComposition:
    """Result of :func:`compose_from_examples`.

    Attributes:
        ids: the members, in the given order.
        weights: the learned weight of each member.
        loss: loss of the learned weights (without the L1 term).
        uniform_loss: loss of uniform weights ``1/n`` (the baseline).
        evaluations: loss evaluations spent.
        history: ``(weights, loss, objective)`` of every evaluation, in order.
    """

    ids: list[str]
    weights: list[float]
    loss: float
    uniform_loss: float
    evaluations: int
    history: list[tuple[list[float], float, float]] = field(default_factory=list, repr=False)

    @property
    def members(self) -> list[tuple[str, float]]:
        """``(id, weight)`` pairs, ready to store as a COMPOSITE adapter's members."""
        return list(zip(self.ids, self.weights))


def search_weights(
    n: int,
    loss_fn: Objective,
    *,
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    init: Sequence[float] | None = None,
    optimizer: str = "NGOpt",
    seed: int = 0,
) -> tuple[list[float], float, list[tuple[list[float], float, float]]]:
    """Minimise ``loss_fn(w) + l1 * mean|w|`` over ``w`` in ``bounds^n`` with ``budget`` evaluations.

    Returns:
        ``(best weights, their loss without the L1 term, history of (weights, loss, objective))``; the first
        evaluation is the start point (``init``, default uniform ``1/n``).

    Raises:
        CompositionError: bad ``n``/``budget``/``bounds``/``init``/``optimizer``, or a non-finite loss.
    """
    import nevergrad as ng

    lo, hi = _check_search(n, budget, bounds, l1)
    start = np.full(n, 1.0 / n) if init is None else np.asarray(init, dtype=np.float64)
    if start.shape != (n,) or not np.all(np.isfinite(start)) or np.any(start < lo) or np.any(start > hi):
        raise CompositionError(f"`init` must be {n} finite weights within `bounds` {bounds}, got {init!r}")
    if optimizer not in ng.optimizers.registry:
        raise CompositionError(f"`optimizer` must be a nevergrad optimizer name (e.g. 'NGOpt'), got {optimizer!r}")
    param = ng.p.Array(init=start).set_bounds(lo, hi)
    param.random_state = np.random.RandomState(seed)
    history: list[tuple[list[float], float, float]] = []

    def evaluate(w: np.ndarray) -> float:
        weights = [float(v) for v in w]
        loss = float(loss_fn(weights))
        if not math.isfinite(loss):
            raise CompositionError(f"`loss_fn` returned a non-finite loss {loss!r} for weights {weights}")
        objective = loss + l1 * float(np.mean(np.abs(w)))
        history.append((weights, loss, objective))
        return objective

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="COBYLA")  # scipy's COBYLA inside NGOpt adjusts its settings
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
        opt.suggest(start)  # the first asked point is the start (uniform unless `init`)
        for _ in range(budget):
            cand = opt.ask()
            opt.tell(cand, evaluate(np.asarray(cand.value)))
    best = min(history, key=lambda h: h[2])
    return best[0], best[1], history


def compose_from_examples(
    ids: Sequence[str],
    examples: Sequence[Any],
    loss_fn: Callable[[list[float], Sequence[Any]], float],
    *,
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    optimizer: str = "NGOpt",
    seed: int = 0,
) -> LearnedComposition:
    """Learn composition weights for ``ids`` on ``examples`` (LoraHub).

    Args:
        ids: member adapter ids (at least one, no repeats).
        examples: the few examples (anything ``loss_fn`` understands, e.g. ``(input, target)`` strings).
        loss_fn: ``(weights, examples) -> mean loss`` of the mixture ``sum_k weights[k] * update(ids[k])``.
        budget: loss evaluations (the uniform start included).
        bounds: box for every weight.
        l1: weight of the ``mean|w|`` regulariser.
        optimizer: a ``nevergrad`` optimizer name.
        seed: seeds the optimizer.

    Returns:
        A :class:`LearnedComposition` (its ``members`` can be stored as a COMPOSITE adapter).
    """
    members = list(ids)
    if not members or len(set(members)) != len(members) or not all(isinstance(i, str) for i in members):
        raise CompositionError(f"`ids` must be distinct adapter ids (at least one), got {ids!r:.200}")
    if len(examples) == 0:
        raise CompositionError("`examples` must hold at least one example, got none")
    exs = list(examples)

    def objective(w: list[float]) -> float:
        return loss_fn(w, exs)

    n = len(members)
    weights, loss, history = search_weights(
        n, objective, budget=budget, bounds=bounds, l1=l1, optimizer=optimizer, seed=seed
    )
    return LearnedComposition(members, weights, loss, history[0][1], len(history), history)


def _check_search(n: int, budget: int, bounds: tuple[float, float], l1: float) -> tuple[float, float]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CompositionError(f"`n` must be a positive int, got {n!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise CompositionError(f"`budget` must be a positive int, got {budget!r}")
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise CompositionError(f"`bounds` must be (low, high), got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CompositionError(f"`bounds` must be finite with low < high, got {bounds!r}")
    if not math.isfinite(l1) or l1 < 0:
        raise CompositionError(f"`l1` must be a finite number >= 0, got {l1!r}")
    return lo, hi
