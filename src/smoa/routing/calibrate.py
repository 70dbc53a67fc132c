"""Out-of-scope by default: the ``"auto"`` routing threshold and the route's calibrated confidence.

The library holds no out-of-scope queries, but every adapter with examples provides two kinds of evidence once
its examples are split into folds (the keys are fitted on one fold and the other fold is scored):

* **in-scope**: a held-out example scored against every adapter -> its best score, the margin to the second best
  and whether the best is its own adapter;
* **out-of-scope proxy**: the same example scored against the *other* adapters only (its own adapter removed):
  this is what a query for an intent the library does not hold looks like ("leave one adapter out");
* **negatives**: the user's own out-of-scope texts (:meth:`Router.add_negative_examples`) scored against all
  adapters.

The threshold is then::

    t = quantile(best score of the held-out in-scope examples, AUTO_REJECT_RATE)   (no negatives)
    t = max(the above, argmax_t acc_in(t) + recall_neg(t))                          (with negatives)

with ``acc_in(t)`` = share of held-out examples routed to their own adapter with a score >= t. ``AUTO_REJECT_RATE``
(0.5 %) was chosen on CLINC150 val (``docs/bench_routing.md``): with the learned query encoder it gives 96.2-96.3 %
in-scope accuracy and 59-61 % OOS recall there (1 %: 95.7 % / 75 %; 0.3 %: 96.3-96.5 % / 53-54 %); the
leave-one-adapter-out proxy alone (Youden) over-rejects (86 % / 98 %), because CLINC's neighbouring intents are
much closer than its out-of-scope queries.

Adapters **without examples** (keyed by their tags / description alone) face a second gate, the *free* threshold
(``free_threshold``): a high quantile (:data:`FREE_NULL_QUANTILE`) of the best score the held-out examples of the
other adapters reach on any example-less adapter -- what an unrelated query scores there (:func:`free_threshold`).
An in-scope example never belongs to an example-less adapter, so this null is honest; without it a library with
many example-less adapters of real text (1M BBC-sentence keys beside CLINC150's 150 intents) routes 81 % of the
out-of-scope queries to one of them, though the threshold of the adapters with examples is right.

Confidence: a logistic model ``p(correct) = sigmoid(a * best + b * margin + c)`` fitted (Newton, L2) on the same
evidence: label 1 for in-scope examples routed correctly, 0 for wrong routes, proxies and negatives. Before any
evidence exists the threshold is :data:`FALLBACK_THRESHOLD` (an encoder-level floor: unrelated sentences score
below it with MiniLM) and the confidence a fixed logistic of the best score.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np

AUTO_REJECT_RATE = 0.005
FREE_NULL_QUANTILE = 0.99  # example-less adapters: beat what 99 % of the other adapters' held-out examples score there
FALLBACK_THRESHOLD = 0.1  # too few examples to calibrate: only clearly unrelated queries go to the base model
MIN_EVIDENCE = 20  # held-out examples needed before the calibrated threshold replaces the fallback
_FALLBACK_COEF = (12.0, 0.0, -4.0)  # p = sigmoid(12 * best - 4): 0.5 at cos 0.33


@dataclass(frozen=True)
class Calibration:
    """The auto threshold and the confidence model.

    Attributes:
        threshold: routes whose best score is below it are empty (base model alone).
        free_threshold: the score an adapter without examples must reach as well (see the module docstring).
        coef: ``(a, b, c)`` of ``sigmoid(a * best + b * margin + c)``.
        n_in: held-out in-scope examples used; ``n_neg``: negatives (proxies + user negatives).
        source: ``"fallback"`` or ``"held-out"``.
    """

    threshold: float = FALLBACK_THRESHOLD
    coef: tuple[float, float, float] = _FALLBACK_COEF
    n_in: int = 0
    n_neg: int = 0
    source: str = "fallback"
    free_threshold: float = -np.inf  # an example-less adapter needs max(threshold, this); -inf: no evidence

    def confidence(self, best: float, margin: float) -> float:
        """Calibrated probability that the best adapter is right (``best``: top score, ``margin``: top - second)."""
        a, b, c = self.coef
        z = min(50.0, max(-50.0, a * best + b * margin + c))
        return 1.0 / (1.0 + math.exp(-z))


@dataclass
class Evidence:
    """Scores collected for calibration (see the module docstring); float32 arrays, one entry per example."""

    in_best: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    in_margin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    in_correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    proxy_best: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    proxy_margin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def held_out_evidence(scores: np.ndarray, labels: np.ndarray) -> Evidence:
    """Evidence from held-out examples.

    Args:
        scores: float ``[m, n]`` score of each held-out example against each of ``n`` adapters (columns).
        labels: int ``[m]`` column of each example's own adapter.

    Returns:
        The in-scope entries and the leave-one-adapter-out proxies.
    """
    m = len(labels)
    if m == 0 or scores.shape[1] == 0:
        return Evidence()
    s = np.asarray(scores, np.float32)
    best, margin = _best_and_margin(s)
    correct = s.argmax(1) == labels
    if s.shape[1] < 2:
        return Evidence(best, margin, correct)
    proxy = s.copy()
    proxy[np.arange(m), labels] = -np.inf
    pbest, pmargin = _best_and_margin(proxy)
    return Evidence(best, margin, correct, pbest, pmargin)


def _best_and_margin(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if s.shape[1] == 1:
        return s[:, 0].copy(), np.ones(len(s), np.float32)
    top2 = np.partition(s, s.shape[1] - 2, axis=1)[:, -2:]
    best = top2.max(1)
    second = np.where(np.isfinite(top2.min(1)), top2.min(1), best - 1.0)
    return best.astype(np.float32), (best - second).astype(np.float32)


def merge(parts: list[Evidence]) -> Evidence:
    """Concatenate evidence."""
    if not parts:
        return Evidence()
    return Evidence(*(np.concatenate([getattr(p, f) for p in parts]) for f in (
        "in_best", "in_margin", "in_correct", "proxy_best", "proxy_margin")))  # fmt: skip


def calibrate(ev: Evidence, neg_best: np.ndarray | None = None, neg_margin: np.ndarray | None = None,
              reject_rate: float = AUTO_REJECT_RATE) -> Calibration:
    """The threshold and confidence model from ``ev`` and the user's negatives' best scores / margins."""
    neg_best = np.zeros(0, np.float32) if neg_best is None else np.asarray(neg_best, np.float32)
    neg_margin = np.zeros(len(neg_best), np.float32) if neg_margin is None else np.asarray(neg_margin, np.float32)
    if len(ev.in_best) < MIN_EVIDENCE:
        return Calibration()
    ok = ev.in_correct
    if len(neg_best):
        cands = np.unique(np.round(np.concatenate([ev.in_best, neg_best]), 4))
        acc = (ok[None, :] & (ev.in_best[None, :] >= cands[:, None])).mean(1)
        rec = (neg_best[None, :] < cands[:, None]).mean(1)
        threshold = max(float(cands[int(np.argmax(acc + rec))]), float(np.quantile(ev.in_best, reject_rate)))
    else:
        threshold = float(np.quantile(ev.in_best, reject_rate))
    x_best = np.concatenate([ev.in_best, ev.proxy_best, neg_best])
    x_margin = np.concatenate([ev.in_margin, ev.proxy_margin, neg_margin])
    y = np.concatenate([ok.astype(np.float64), np.zeros(len(ev.proxy_best) + len(neg_best))])
    coef = _logistic(np.stack([x_best, x_margin], 1).astype(np.float64), y)
    return Calibration(threshold, coef, len(ev.in_best), int(len(ev.proxy_best) + len(neg_best)), "held-out")


def free_threshold(null_best: np.ndarray, quantile: float = FREE_NULL_QUANTILE) -> float:
    """The free threshold from ``null_best``: per held-out example, its best score on an example-less adapter
    (``-inf`` where none was among its nearest keys: lower than those). ``-inf`` with too little evidence."""
    null_best = np.asarray(null_best, np.float64)
    if len(null_best) < MIN_EVIDENCE or not np.isfinite(null_best).any():
        return -np.inf
    return float(np.quantile(null_best, quantile, method="higher"))


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 25) -> tuple[float, float, float]:
    """L2-regularised logistic regression by Newton's method: ``x [m, 2]``, ``y [m]`` in {0, 1} -> ``(a, b, c)``."""
    if len(np.unique(y)) < 2:
        return _FALLBACK_COEF
    xb = np.concatenate([x, np.ones((len(x), 1))], 1)  # [m, 3]
    w = np.zeros(3)
    reg = l2 * len(x) * np.diag([1.0, 1.0, 0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -50, 50)))
        grad = xb.T @ (p - y) + reg @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + reg + 1e-9 * np.eye(3)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return float(w[0]), float(w[1]), float(w[2])


__all__ = ["AUTO_REJECT_RATE", "FALLBACK_THRESHOLD", "FREE_NULL_QUANTILE", "Calibration", "Evidence", "calibrate",
           "free_threshold", "held_out_evidence", "merge"]
