"""Factored similarity against dense flattened updates; sketches against exact cosines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights
from smoa.compose.similarity import (
    LoraStack,
    batched_cosine,
    batched_inner,
    cosine,
    inner,
    norm,
    sketch,
    sketch_batch,
    stack_weights,
)
from smoa.errors import CompositionError, ProfileMismatchError

PROFILE = BaseProfile("toy", (("m0", 24, 16), ("m1", 24, 16), ("m2", 40, 8)))


def _adapter(gen: torch.Generator, rank: int, modules: list[str], alpha: float = 4.0) -> LoraWeights:
    factors = {}
    for m in modules:
        d_in, d_out = PROFILE.shape(m)
        factors[m] = (torch.randn(rank, d_in, generator=gen, dtype=torch.float64),
                      torch.randn(d_out, rank, generator=gen, dtype=torch.float64))  # fmt: skip
    return LoraWeights(factors, alpha, rank)


def _dense_vector(w: LoraWeights) -> torch.Tensor:
    parts = []
    for m in PROFILE.module_names:
        d_in, d_out = PROFILE.shape(m)
        parts.append(w.delta(m).reshape(-1) if m in w.factors else torch.zeros(d_in * d_out, dtype=torch.float64))
    return torch.cat(parts)


def _mix(x: LoraWeights, y: LoraWeights, lam: float) -> LoraWeights:
    """An adapter whose update is ``lam * dW_x + (1 - lam) * dW_y`` (same modules, rank r_x + r_y)."""
    f = {}
    for m in x.factors:
        (ax, bx), (ay, by) = x.factors[m], y.factors[m]
        f[m] = (torch.cat([ax, ay]), torch.cat([lam * x.scaling * bx, (1 - lam) * y.scaling * by], dim=1))
    r = x.rank + y.rank
    return LoraWeights(f, float(r), r)


def test_inner_and_cosine_match_dense_over_different_module_sets() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = _adapter(g, 2, ["m0", "m1"], alpha=3.0), _adapter(g, 3, ["m1", "m2"], alpha=6.0)
    dx, dy = _dense_vector(x), _dense_vector(y)
    assert inner(x, y) == pytest.approx(float(dx @ dy), rel=1e-10)
    assert norm(x) == pytest.approx(float(dx.norm()), rel=1e-10)
    assert cosine(x, y) == pytest.approx(float(dx @ dy / (dx.norm() * dy.norm())), rel=1e-10)
    assert cosine(x, x) == pytest.approx(1.0)


def test_zero_update_has_cosine_zero_and_zero_sketch() -> None:
    g = torch.Generator().manual_seed(1)
    x = _adapter(g, 2, ["m0"])
    fresh = LoraWeights({"m0": (torch.randn(2, 24), torch.zeros(16, 2))}, 4.0, 2)
    assert cosine(x, fresh) == 0.0
    assert not sketch(fresh, PROFILE).any()


def test_batched_inner_and_cosine_equal_pairwise() -> None:
    g = torch.Generator().manual_seed(2)
    xs = [_adapter(g, 2, ["m0", "m2"], alpha=float(i + 1)) for i in range(5)]
    ys = [_adapter(g, 2, ["m2", "m0"]) for _ in range(5)]
    sx, sy = stack_weights(xs), stack_weights(ys)
    torch.testing.assert_close(batched_inner(sx, sy), torch.tensor([inner(a, b) for a, b in zip(xs, ys)], dtype=torch.float64))
    torch.testing.assert_close(batched_cosine(sx, sy), torch.tensor([cosine(a, b) for a, b in zip(xs, ys)], dtype=torch.float64))
    back = sx.unstack(3)
    assert inner(back, xs[3]) == pytest.approx(inner(xs[3], xs[3]))


def test_stack_refuses_different_module_sets() -> None:
    g = torch.Generator().manual_seed(3)
    with pytest.raises(CompositionError, match="adapters"):
        stack_weights([_adapter(g, 2, ["m0"]), _adapter(g, 2, ["m1"])])


def test_sketch_is_deterministic_and_batch_equals_single() -> None:
    g = torch.Generator().manual_seed(4)
    xs = [_adapter(g, 2, ["m0", "m1"]) for _ in range(4)]
    batch = sketch_batch(stack_weights(xs), PROFILE, dim=32, seed=5)
    assert batch.dtype == np.float32 and batch.shape == (4, 32)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(batch[i], sketch(x, PROFILE, dim=32, seed=5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(batch[0], sketch(xs[0], PROFILE, dim=32, seed=6))


def test_sketch_refuses_modules_outside_the_profile() -> None:
    w = LoraWeights({"other": (torch.randn(2, 24), torch.randn(16, 2))}, 4.0, 2)
    with pytest.raises(ProfileMismatchError, match="other"):
        sketch(w, PROFILE)


def test_sketch_cosines_track_exact_cosines() -> None:
    g = torch.Generator().manual_seed(6)
    n = 300
    xs = stack_weights([_adapter(g, 2, ["m0", "m1", "m2"]) for _ in range(n)])
    ys = stack_weights([_adapter(g, 2, ["m0", "m1", "m2"]) for _ in range(n)])
    lam = torch.rand(n, generator=g, dtype=torch.float64)[:, None, None]
    zs = LoraStack(  # z_i = lam_i x_i + (1 - lam_i) y_i, pairs spanning cosines from ~0 to 1
        {m: (torch.cat([xs.factors[m][0], ys.factors[m][0]], dim=1),
             torch.cat([lam * xs.factors[m][1], (1 - lam) * ys.factors[m][1]], dim=2)) for m in xs.factors},
        xs.scaling,
    )  # fmt: skip
    exact = batched_cosine(xs, zs).numpy()
    approx = (sketch_batch(xs, PROFILE, dim=128) * sketch_batch(zs, PROFILE, dim=128)).sum(axis=1)
    assert exact.min() < 0.3 and exact.max() > 0.95
    assert np.corrcoef(exact, approx)[0, 1] > 0.95
    assert np.abs(exact - approx).mean() < 0.06


def test_sketch_inner_product_is_unbiased_over_seeds() -> None:
    g = torch.Generator().manual_seed(7)
    x, y = _adapter(g, 2, ["m0", "m2"]), _adapter(g, 2, ["m0", "m2"])
    z = _mix(x, y, 0.6)
    est = np.mean([float(sketch(x, PROFILE, dim=64, seed=s) @ sketch(z, PROFILE, dim=64, seed=s)) for s in range(200)])
    assert est == pytest.approx(cosine(x, z), abs=0.03)
