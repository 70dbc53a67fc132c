"""Similarity of adapter updates through their factors, and sketches for finding near-duplicates at scale.

An adapter's update is the list of per-module matrices ``dW_m = s * B_m A_m`` (``d_out x d_in``), seen as one
long vector. Two adapters' Frobenius inner product never needs ``dW``::

    <B1 A1, B2 A2>_F = trace(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T))     # r1 x r2 matrices only

summed over the modules both adapters hold (a module one of them lacks contributes zero).

A *sketch* is a short vector whose cosines approximate the cosines of the updates (so an ANN index over
sketches finds near-duplicate candidates). Coordinate ``j`` of the sketch is a rank-one random projection of
every module's update, taken through the factors::

    y_j = sum_m  g_{m,j}^T dW_m h_{m,j} = sum_m s * sum_r (G_m^T B_m)[j, r] * (A_m H_m)[r, j]

with ``G_m`` (``d_out x dim``) and ``H_m`` (``d_in x dim``) standard Gaussian, fixed by ``(seed, module)``.
Since ``E[y_j(X) y_j(Y)] = <X, Y>_F``, ``<y(X), y(Y)> / dim`` is an unbiased estimate of the inner product
(a Johnson-Lindenstrauss sketch with Khatri-Rao rows); sketches are returned L2-normalised. Cost per adapter
and module: ``r * (d_in + d_out) * dim`` multiply-adds. :func:`sketch_batch` does many adapters with the same
modules at once (a million NANO adapters sketch in about a minute on two cores).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights
from smoa.errors import CompositionError, ProfileMismatchError

DEFAULT_SKETCH_DIM = 64


# ---------------------------------------------------------------------------------------------------------------
# exact similarity, one pair at a time
# ---------------------------------------------------------------------------------------------------------------
def inner(x: LoraWeights, y: LoraWeights) -> float:
    """``sum_m <s_x B_x A_x, s_y B_y A_y>_F`` over the modules both hold, via ``r x r`` products (float64)."""
    total = 0.0
    for module, (a1, b1) in x.factors.items():
        if module not in y.factors:
            continue
        a2, b2 = y.factors[module]
        gram_b = b1.double().T @ b2.double()  # [r1, r2]
        gram_a = a1.double() @ a2.double().T  # [r1, r2]
        total += float((gram_b * gram_a).sum())
    return x.scaling * y.scaling * total


def norm(x: LoraWeights) -> float:
    """Frobenius norm of the whole update (all modules)."""
    return math.sqrt(max(inner(x, x), 0.0))


def cosine(x: LoraWeights, y: LoraWeights) -> float:
    """Cosine of the two updates; 0.0 when either update is zero (e.g. a freshly initialised adapter)."""
    nx, ny = norm(x), norm(y)
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return inner(x, y) / (nx * ny)


# ---------------------------------------------------------------------------------------------------------------
# batches of adapters with identical module sets
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoraStack:
    """``N`` adapters with the same modules and rank, stacked.

    Attributes:
        factors: module -> ``(A [N, r, d_in], B [N, d_out, r])``.
        scaling: ``[N]`` per-adapter ``alpha / rank``.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: torch.Tensor

    def __len__(self) -> int:
        return int(self.scaling.shape[0])

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    def select(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> LoraStack:
        """Rows ``index`` (any integer index, repeats allowed)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return LoraStack({m: (a[idx], b[idx]) for m, (a, b) in self.factors.items()}, self.scaling[idx])

    def unstack(self, i: int) -> LoraWeights:
        """Adapter ``i`` as :class:`LoraWeights` (``alpha = scaling * rank``)."""
        rank = int(next(iter(self.factors.values()))[0].shape[1])
        f = {m: (a[i].clone(), b[i].clone()) for m, (a, b) in self.factors.items()}
        return LoraWeights(f, float(self.scaling[i]) * rank, rank)


def stack_weights(adapters: Sequence[LoraWeights]) -> LoraStack:
    """Stack adapters that share module set (same order not required) and rank.

    Raises:
        CompositionError: no adapters, or module sets / ranks differ.
    """
    if not adapters:
        raise CompositionError("`adapters` must hold at least one adapter, got none")
    modules = adapters[0].modules
    key = set(modules)
    for i, a in enumerate(adapters):
        if set(a.factors) != key or a.rank != adapters[0].rank:
            raise CompositionError(
                f"`adapters`[{i}] has modules/rank {sorted(a.factors)[:3]}.../{a.rank}, "
                f"expected the same as `adapters`[0] ({sorted(key)[:3]}.../{adapters[0].rank})"
            )
    factors = {
        m: (torch.stack([a.factors[m][0] for a in adapters]), torch.stack([a.factors[m][1] for a in adapters]))
        for m in modules
    }
    return LoraStack(factors, torch.tensor([a.scaling for a in adapters], dtype=torch.float64))


def batched_inner(x: LoraStack, y: LoraStack) -> torch.Tensor:
    """Row-wise ``<update x_i, update y_i>`` (``[N]``, float64) over the modules both stacks hold."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for module, (a1, b1) in x.factors.items():
        if module not in y.factors:
            continue
        a2, b2 = y.factors[module]
        gram_b = b1.double().transpose(1, 2) @ b2.double()  # [N, r1, r2]
        gram_a = a1.double() @ a2.double().transpose(1, 2)  # [N, r1, r2]
        total += (gram_b * gram_a).sum(dim=(1, 2))
    return total * x.scaling.double() * y.scaling.double()


def batched_norm(x: LoraStack) -> torch.Tensor:
    """``[N]`` Frobenius norms of the updates."""
    return batched_inner(x, x).clamp(min=0.0).sqrt()


def batched_cosine(x: LoraStack, y: LoraStack) -> torch.Tensor:
    """Row-wise cosine (``[N]``, float64); 0 where either update is zero."""
    denom = batched_norm(x) * batched_norm(y)
    dots = batched_inner(x, y)
    return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))


# ---------------------------------------------------------------------------------------------------------------
# sketches
# ---------------------------------------------------------------------------------------------------------------
def sketch(weights: LoraWeights, profile: BaseProfile, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0) -> np.ndarray:
    """``[dim]`` float32 unit vector whose cosines approximate update cosines (zero vector for a zero update).

    Adapters sketched with the same ``profile``, ``dim`` and ``seed`` are comparable whatever their modules.
    """
    _check_dim(dim)
    y = torch.zeros(dim, dtype=torch.float32)
    for module, (a, b) in weights.factors.items():
        g_out, h_in = projection(profile, module, dim, seed)
        p = b.float().T @ g_out  # [r, dim]
        q = a.float() @ h_in  # [r, dim]
        y += weights.scaling * (p * q).sum(dim=0)
    return _normalise(y[None])[0]


def sketch_batch(stack: LoraStack, profile: BaseProfile, dim: int = DEFAULT_SKETCH_DIM, seed: int = 0) -> np.ndarray:
    """``[N, dim]`` float32 sketches of a stack; row ``i`` equals ``sketch(stack.unstack(i), ...)``."""
    _check_dim(dim)
    y = torch.zeros(len(stack), dim, dtype=torch.float32)
    for module, (a, b) in stack.factors.items():
        g_out, h_in = projection(profile, module, dim, seed)
        p = b.float().transpose(1, 2) @ g_out  # [N, r, dim]
        q = a.float() @ h_in  # [N, r, dim]
        y += (p * q).sum(dim=1)  # [N, dim]
    y *= stack.scaling.float()[:, None]
    return _normalise(y)


def projection(profile: BaseProfile, module: str, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_out [d_out, dim], H_in [d_in, dim])`` standard Gaussian, fixed by ``(seed, module, shape)``."""
    if module not in profile:
        raise ProfileMismatchError(f"module {module!r} is not in profile {profile.name!r}")
    d_in, d_out = profile.shape(module)
    return _projection(module, d_in, d_out, dim, seed)


@functools.lru_cache(maxsize=1024)
def _projection(module: str, d_in: int, d_out: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256(f"{seed}:{module}:{d_in}:{d_out}:{dim}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    g_out = torch.randn(d_out, dim, generator=gen)
    h_in = torch.randn(d_in, dim, generator=gen)
    return g_out, h_in


def _normalise(y: torch.Tensor) -> np.ndarray:
    n = y.norm(dim=1, keepdim=True)
    out = torch.where(n > 0, y / n.clamp(min=1e-30), torch.zeros_like(y))
    return out.numpy().astype(np.float32, copy=False)


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise CompositionError(f"`dim` must be a positive int, got {dim!r}")
