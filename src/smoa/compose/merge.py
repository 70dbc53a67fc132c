"""Merging LoRA adapters: pure tensor functions over :class:`~smoa.adapter.weights.LoraWeights`.

Every method approximates (or reproduces) the weighted sum of the members' updates, module by module::

    target_m = sum_i  w_i * s_i * B_i[m] @ A_i[m]          (s_i = alpha_i / rank_i; absent module -> 0)

and returns one plain adapter. The methods, and when each is exact:

=================  ==============================================================  ===========================
method             what it does                                                     exact?
=================  ==============================================================  ===========================
``cat``            ranks concatenated: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1 ...]``  always (rank = sum ranks)
``svd``            best rank-``r`` approximation of ``target`` (Eckart-Young),      when ``r`` >= rank of target
                   computed in factored form: QR of the stacked B's and A^T's,
                   then an SVD of a small ``R x R`` core (``R`` = sum of ranks)
``linear``         PEFT's factor averaging: ``A = sum sign_i sqrt|w_i s_i| A_i``,   one member only (cross terms)
                   ``B = sum sqrt|w_i s_i| B_i``
``ties``           ``linear`` on each factor after TIES (magnitude trim,            no (one member, density 1)
                   sign election, disjoint mean)
``dare_linear``    ``linear`` after DARE (random drop, rescale by 1/density)        no (one member, density 1)
``dare_ties``      DARE drop, then sign election and disjoint mean                  no (one member, density 1)
``magnitude_prune````linear`` after keeping the top-``density`` magnitudes           no (one member, density 1)
=================  ==============================================================  ===========================

The factor-space methods (``linear`` ... ``magnitude_prune``) follow PEFT's ``add_weighted_adapter``
(``peft/tuners/lora/model.py``) and ``peft/utils/merge_utils.py`` exactly, with two extensions: members of
different ranks are zero-padded to the largest rank (PEFT refuses them; padding leaves every member's update
unchanged), and DARE draws its masks from a seeded generator. Every result has ``alpha == rank`` (scaling 1),
as PEFT's merged adapters do. :func:`merge_error` reports ``||merged - target||_F / ||target||_F`` over all
modules, computed through the factors (QR of stacked factors), never forming a ``d_out x d_in`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from smoa.adapter.weights import LoraWeights
from smoa.errors import CompositionError

DEFAULT_DENSITY = 0.5
_Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MethodInfo:
    """What a merge method promises.

    Attributes:
        name: method name as given to :func:`combine`.
        exact: when the merged update equals the weighted sum of updates (in words).
        needs_density: whether ``density`` is used.
        random: whether ``seed`` is used.
    """

    name: str
    exact: str
    needs_density: bool = False
    random: bool = False


METHODS: dict[str, MethodInfo] = {
    "cat": MethodInfo("cat", "always"),
    "svd": MethodInfo("svd", "when `rank` >= the rank of the weighted sum (e.g. >= the sum of member ranks)"),
    "linear": MethodInfo("linear", "for a single member (factor averaging adds cross terms B_i A_j)"),
    "ties": MethodInfo("ties", "for a single member at density 1", needs_density=True),
    "dare_linear": MethodInfo("dare_linear", "for a single member at density 1", needs_density=True, random=True),
    "dare_ties": MethodInfo("dare_ties", "for a single member at density 1", needs_density=True, random=True),
    "magnitude_prune": MethodInfo("magnitude_prune", "for a single member at density 1", needs_density=True),
}


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def combine(
    adapters: Sequence[LoraWeights],
    weights: Sequence[float] | None = None,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    majority_sign_method: str = "total",
) -> LoraWeights:
    """Merge ``adapters`` into one adapter approximating ``sum_i weights[i] * update_i``.

    Args:
        adapters: the members (any ranks, any module sets; the result covers the union of modules in order of
            first appearance).
        weights: one finite weight per member; ``None`` means 1 each.
        method: one of :data:`METHODS`.
        rank: output rank for ``svd`` (default: the largest member rank); refused for other methods.
        density: kept fraction in ``(0, 1]`` for ``ties``/``dare_*``/``magnitude_prune`` (default
            :data:`DEFAULT_DENSITY`).
        seed: seed of the DARE drop masks (default 0, so merges are reproducible).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election, as PEFT).

    Returns:
        A new :class:`LoraWeights` with ``alpha == rank`` (scaling 1), in the first member's dtype.

    Raises:
        CompositionError: no members, a weight count mismatch, a non-finite weight, an unknown method, or a
            ``rank``/``density`` out of range.
    """
    ws = _check_members(adapters, weights)
    info = METHODS.get(method)
    if info is None:
        raise CompositionError(f"`method` must be one of {tuple(METHODS)}, got {method!r}")
    if rank is not None and method != "svd":
        raise CompositionError(f"`rank` is only used by method 'svd', got rank={rank!r} with method {method!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise CompositionError(f"`rank` must be a positive int, got {rank!r}")
    if density is not None and not info.needs_density:
        raise CompositionError(f"`density` is not used by method {method!r}, got density={density!r}")
    dens = DEFAULT_DENSITY if density is None else density
    if isinstance(dens, bool) or not isinstance(dens, (int, float)) or not 0.0 < dens <= 1.0:
        raise CompositionError(f"`density` must be in (0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise CompositionError(f"`majority_sign_method` must be 'total' or 'frequency', got {majority_sign_method!r}")
    dtype = next(iter(adapters[0].factors.values()))[0].dtype
    if method == "cat":
        out = merge_cat(adapters, ws)
    elif method == "svd":
        out = merge_svd(adapters, ws, rank or max(a.rank for a in adapters))
    else:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        out = merge_factorwise(adapters, ws, method, float(dens), gen, majority_sign_method)
    return out.to(dtype=dtype)


def combine_mean(
    adapters: Sequence[LoraWeights],
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
) -> LoraWeights:
    """Merge ``adapters`` into (an approximation of) their mean update ``(1/n) sum_i update_i``.

    ``cat`` and ``svd`` get weights ``1/n``. The factor-space methods scale *both* factors by ``sqrt(w_i s_i)``
    (PEFT): the summing ones (``linear``, ``dare_linear``, ``magnitude_prune``) get ``w_i = 1/n^2``, which
    averages each factor (``A = sqrt(s) mean(A_i)``, ``B = sqrt(s) mean(B_i)``); the TIES ones already take a
    (disjoint) mean per entry and get ``w_i = 1``. Either way identical members come back unchanged (at density
    1). Measure the result with ``merge_error(adapters, [1/n] * n, merged)``.
    """
    n = len(adapters)
    w = {"cat": 1.0 / n, "svd": 1.0 / n, "ties": 1.0, "dare_ties": 1.0}.get(method, 1.0 / (n * n))
    return combine(adapters, [w] * n, method, rank, density, seed)


def merge_error(adapters: Sequence[LoraWeights], weights: Sequence[float] | None, merged: LoraWeights) -> float:
    """Relative Frobenius error ``||merged - target||_F / ||target||_F`` over all modules.

    ``target`` is ``sum_i w_i s_i B_i A_i`` per module. Computed in factored form (float64). Returns 0.0 when
    both are zero and ``inf`` when only the target is zero.
    """
    ws = _check_members(adapters, weights)
    err2 = tgt2 = 0.0
    for module in _module_union([*adapters, merged]):
        bs, as_ = _weighted_terms(adapters, ws, module)
        tgt2 += factored_norm(bs, as_) ** 2
        if module in merged.factors:
            a_m, b_m = merged.factors[module]
            bs = [merged.scaling * b_m.double(), *(-b for b in bs)]
            as_ = [a_m.double(), *as_]
        err2 += factored_norm(bs, as_) ** 2
    if tgt2 == 0.0:
        return 0.0 if err2 == 0.0 else math.inf
    return math.sqrt(err2 / tgt2)


def factored_norm(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> float:
    """``||sum_i B_i @ A_i||_F`` without forming the product.

    With ``U = [B_1 ... B_n]`` (``[d_out, R]``) and ``V = [A_1; ...; A_n]`` (``[R, d_in]``): ``U = Q_u R_u``,
    ``V^T = Q_v R_v``, so ``||U V||_F = ||R_u R_v^T||_F`` (an ``R x R`` product; numerically stable even when
    the sum nearly cancels, unlike a Gram-matrix formula).
    """
    if not bs:
        return 0.0
    u = torch.cat([b.double() for b in bs], dim=1)  # [d_out, R]
    v = torch.cat([a.double() for a in as_], dim=0)  # [R, d_in]
    r_u = torch.linalg.qr(u, mode="r")[1]  # [k1, R]
    r_v = torch.linalg.qr(v.T, mode="r")[1]  # [k2, R]
    return float(torch.linalg.matrix_norm(r_u @ r_v.T))


# ---------------------------------------------------------------------------------------------------------------
# exact and optimal methods
# ---------------------------------------------------------------------------------------------------------------
def merge_cat(adapters: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    """Exact merge by rank concatenation (PEFT ``cat``): rank = sum of member ranks, scaling 1.

    Module ``m`` gets ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]`` (``[sum r_i, d_in]``) and ``B = [B_1 ... B_n]``
    (``[d_out, sum r_i]``); a member without ``m`` fills its block with zeros.
    """
    total = sum(a.rank for a in adapters)
    factors: _Factors = {}
    for module in _module_union(adapters):
        d_in, d_out = _module_shape(adapters, module)
        a_out = torch.zeros(total, d_in, dtype=torch.float64)
        b_out = torch.zeros(d_out, total, dtype=torch.float64)
        offset = 0
        for lw, w in zip(adapters, weights):
            if module in lw.factors:
                a, b = lw.factors[module]
                a_out[offset : offset + lw.rank] = (w * lw.scaling) * a.double()
                b_out[:, offset : offset + lw.rank] = b.double()
            offset += lw.rank
        factors[module] = (a_out, b_out)
    return LoraWeights(factors, float(total), total)


def merge_svd(adapters: Sequence[LoraWeights], weights: Sequence[float], rank: int) -> LoraWeights:
    """Best rank-``rank`` approximation of the weighted sum, per module, in factored form.

    With ``U = [w_1 s_1 B_1 ...]`` (``[d_out, R]``) and ``V = [A_1; ...]`` (``[R, d_in]``)::

        U = Q_u R_u,  V^T = Q_v R_v,  R_u R_v^T = P S Z^T   (SVD of a k1 x k2 core, k <= R)
        B = Q_u P_r sqrt(S_r)    [d_out, rank]
        A = sqrt(S_r) Z_r^T Q_v^T  [rank, d_in]

    so ``B A`` is the truncated SVD of ``U V`` (optimal in Frobenius and spectral norm, Eckart-Young) at a
    cost of ``O((d_out + d_in) R^2)``. Singular values are split evenly between ``A`` and ``B`` (PEFT puts them
    all in ``B``; the product is the same). When the sum has rank below ``rank`` the extra rows/columns are 0.
    """
    factors: _Factors = {}
    for module in _module_union(adapters):
        d_in, d_out = _module_shape(adapters, module)
        bs, as_ = _weighted_terms(adapters, weights, module)
        factors[module] = truncated_factors(bs, as_, rank, d_in, d_out)
    return LoraWeights(factors, float(rank), rank)


def truncated_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], rank: int, d_in: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, d_in], B [d_out, rank])`` (float64): ``B A`` is the best rank-``rank`` approximation of
    ``sum_i B_i A_i``."""
    u = torch.cat([b.double() for b in bs], dim=1)  # [d_out, R]
    v = torch.cat([a.double() for a in as_], dim=0)  # [R, d_in]
    q_u, r_u = torch.linalg.qr(u)  # [d_out, k1], [k1, R]
    q_v, r_v = torch.linalg.qr(v.T)  # [d_in, k2], [k2, R]
    p, s, zh = torch.linalg.svd(r_u @ r_v.T)  # [k1, k1], [k], [k2, k2]
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b_out = torch.zeros(d_out, rank, dtype=torch.float64)
    a_out = torch.zeros(rank, d_in, dtype=torch.float64)
    b_out[:, :r] = (q_u @ p[:, :r]) * root  # [d_out, r]
    a_out[:r] = root[:, None] * (zh[:r] @ q_v.T)  # [r, d_in]
    return a_out, b_out


# ---------------------------------------------------------------------------------------------------------------
# factor-space methods (PEFT add_weighted_adapter semantics)
# ---------------------------------------------------------------------------------------------------------------
def merge_factorwise(
    adapters: Sequence[LoraWeights],
    weights: Sequence[float],
    method: str,
    density: float,
    generator: torch.Generator,
    majority_sign_method: str = "total",
) -> LoraWeights:
    """``linear``/``ties``/``dare_*``/``magnitude_prune`` applied to the A's and to the B's separately.

    As PEFT: member ``i`` enters A with weight ``sign(w_i s_i) sqrt|w_i s_i|`` and B with ``sqrt|w_i s_i|``;
    a member without the module is skipped for it (equivalently: contributes zeros). Members of lower rank are
    zero-padded to the largest rank. DARE masks are drawn module by module, A's before B's, member by member.
    """
    rank = max(a.rank for a in adapters)
    fn = _TASK_FUNCS[method]
    factors: _Factors = {}
    for module in _module_union(adapters):
        a_list, b_list, wa, wb = [], [], [], []
        for lw, w in zip(adapters, weights):
            if module not in lw.factors:
                continue
            a, b = lw.factors[module]
            pad = rank - lw.rank
            a_list.append(torch.nn.functional.pad(_work(a), (0, 0, 0, pad)))  # [rank, d_in]
            b_list.append(torch.nn.functional.pad(_work(b), (0, pad)))  # [d_out, rank]
            ws = w * lw.scaling
            root = math.sqrt(abs(ws))
            wa.append(math.copysign(root, ws) if ws != 0 else 0.0)
            wb.append(root)
        a_new = fn(a_list, torch.tensor(wa, dtype=a_list[0].dtype), density, generator, majority_sign_method)
        b_new = fn(b_list, torch.tensor(wb, dtype=b_list[0].dtype), density, generator, majority_sign_method)
        factors[module] = (a_new, b_new)
    return LoraWeights(factors, float(rank), rank)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries (PEFT ``magnitude_based_pruning``)."""
    if density >= 1.0:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1/density`` (PEFT ``random_pruning``)."""
    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``[n, ...]`` bool: entries whose sign equals the elected sign of their position (ties: +)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1.0, -1.0)


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over members of the agreeing entries: ``sum(x * mask) / max(count, 1)``."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def _weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))).sum(dim=0)


def _linear(ts: list[torch.Tensor], w: torch.Tensor, density: float, g: torch.Generator, msm: str) -> torch.Tensor:
    return _weighted_sum(torch.stack(ts), w)


def _magnitude_prune(
    ts: list[torch.Tensor], w: torch.Tensor, density: float, g: torch.Generator, msm: str
) -> torch.Tensor:
    return _weighted_sum(torch.stack([magnitude_mask(t, density) for t in ts]), w)


def _dare_linear(ts: list[torch.Tensor], w: torch.Tensor, density: float, g: torch.Generator, msm: str) -> torch.Tensor:
    return _weighted_sum(torch.stack([random_drop(t, density, g) for t in ts]), w)


def _elect_and_merge(stacked: torch.Tensor, w: torch.Tensor, msm: str) -> torch.Tensor:
    mask = majority_sign_mask(stacked, msm)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    return disjoint_mean(weighted, mask)


def _ties(ts: list[torch.Tensor], w: torch.Tensor, density: float, g: torch.Generator, msm: str) -> torch.Tensor:
    return _elect_and_merge(torch.stack([magnitude_mask(t, density) for t in ts]), w, msm)


def _dare_ties(ts: list[torch.Tensor], w: torch.Tensor, density: float, g: torch.Generator, msm: str) -> torch.Tensor:
    return _elect_and_merge(torch.stack([random_drop(t, density, g) for t in ts]), w, msm)


_TaskFn = Callable[[list[torch.Tensor], torch.Tensor, float, torch.Generator, str], torch.Tensor]
_TASK_FUNCS: dict[str, _TaskFn] = {
    "linear": _linear,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "magnitude_prune": _magnitude_prune,
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _check_members(adapters: Sequence[LoraWeights], weights: Sequence[float] | None) -> list[float]:
    if not adapters:
        raise CompositionError("`adapters` must hold at least one adapter, got none")
    for i, a in enumerate(adapters):
        if not isinstance(a, LoraWeights):
            raise CompositionError(f"`adapters`[{i}] must be LoraWeights, got {type(a).__name__}")
        if not a.factors:
            raise CompositionError(f"`adapters`[{i}] has no modules")
    if weights is None:
        return [1.0] * len(adapters)
    ws = list(weights)
    if len(ws) != len(adapters):
        raise CompositionError(f"`weights` must have one entry per adapter ({len(adapters)}), got {len(ws)}")
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise CompositionError(f"`weights`[{i}] must be a finite number, got {w!r}")
    return [float(w) for w in ws]


def _work(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; every other float dtype is computed in float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _module_union(adapters: Sequence[LoraWeights]) -> list[str]:
    seen: dict[str, None] = {}
    for a in adapters:
        for m in a.factors:
            seen.setdefault(m, None)
    return list(seen)


def _module_shape(adapters: Sequence[LoraWeights], module: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of ``module``; members must agree."""
    shapes = {
        (int(a.factors[module][0].shape[1]), int(a.factors[module][1].shape[0])) for a in adapters if module in a.factors
    }
    if len(shapes) != 1:
        raise CompositionError(f"members disagree on the shape (d_in, d_out) of module {module!r}: {sorted(shapes)}")
    return shapes.pop()


def _weighted_terms(
    adapters: Sequence[LoraWeights], weights: Sequence[float], module: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([w_i s_i B_i], [A_i])`` in float64 for the members holding ``module``."""
    bs, as_ = [], []
    for lw, w in zip(adapters, weights):
        if module in lw.factors:
            a, b = lw.factors[module]
            bs.append((w * lw.scaling) * b.double())
            as_.append(a.double())
    if bs:
        _module_shape(adapters, module)
    return bs, as_
