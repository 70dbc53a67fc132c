"""Which modules an adapter targets, chosen so its parameter count lands in its granularity's range.

A rank-``r`` LoRA on a module ``d_in -> d_out`` has ``r * (d_in + d_out)`` parameters. Modules are taken
kind by kind in a preference order (value, query, output, key projections, then the MLP, then the rest in
model order), and within a kind layer by layer in an evenly spread order (0, L/2, L/4, 3L/4, ...), adding a
module only while the total stays within the range's upper bound, until the total reaches the range's geometric
mean (e.g. 3,162 for NANO) — mid-range, so adapters stay small for huge libraries but still span layers.
The count is exact: ``num_parameters == sum r * (d_in + d_out)`` over the chosen modules.

On the default profile (SmolLM2-135M) a NANO adapter at rank 2 targets ``v_proj`` in 3 layers (0, 15, 7):
4,608 parameters.
"""

from __future__ import annotations

import math

from smoa.adapter.profile import BaseProfile, layer_index, module_kind
from smoa.config import AdapterGranularity
from smoa.errors import InvalidInputError

_KIND_PREFERENCE = ("v_proj", "q_proj", "o_proj", "k_proj", "down_proj", "up_proj", "gate_proj",
                    "c_attn", "c_proj", "c_fc")  # fmt: skip


def lora_param_count(profile: BaseProfile, modules: list[str], rank: int) -> int:
    """Exact trainable-parameter count of a rank-``rank`` LoRA on ``modules``."""
    return sum(rank * sum(profile.shape(m)) for m in modules)


def _spread(n: int) -> list[int]:
    """0..n-1 in an evenly spread (van der Corput-like) order."""
    order: list[int] = []
    seen: set[int] = set()
    denom = 1
    while len(order) < n:
        for k in range(denom):
            i = (k * n) // denom
            if i not in seen:
                seen.add(i)
                order.append(i)
        denom *= 2
    return order


def candidate_order(profile: BaseProfile) -> list[str]:
    """All profile modules in the order granularity selection considers them."""
    kinds: dict[str, list[str]] = {}
    for m in profile.module_names:
        kinds.setdefault(module_kind(m), []).append(m)

    def rank_kind(kind: str) -> tuple[int, int]:
        leaf = kind.rsplit(".", 1)[-1]
        pref = _KIND_PREFERENCE.index(leaf) if leaf in _KIND_PREFERENCE else len(_KIND_PREFERENCE)
        return pref, list(kinds).index(kind)

    out: list[str] = []
    for kind in sorted(kinds, key=rank_kind):
        mods = sorted(kinds[kind], key=layer_index)
        out += [mods[i] for i in _spread(len(mods))]
    return out


def select_modules(profile: BaseProfile, granularity: AdapterGranularity, rank: int) -> list[str]:
    """Modules for an adapter of ``granularity`` at ``rank`` (returned in model order).

    Raises:
        InvalidInputError: when no module set at this rank fits the granularity's range.
    """
    lo, hi = granularity.param_range
    target = math.sqrt(lo * hi) if hi != math.inf else math.inf
    chosen: list[str] = []
    total = 0
    for m in candidate_order(profile):
        cost = rank * sum(profile.shape(m))
        if total + cost <= hi:
            chosen.append(m)
            total += cost
            if total >= target:
                break
    if total < lo:
        smallest = min(rank * sum(profile.shape(m)) for m in profile.module_names)
        why = (
            f"one module alone needs {smallest:,} parameters at this rank"
            if smallest > hi
            else f"all fitting modules give only {total:,}"
        )
        raise InvalidInputError(
            f"`rank`={rank} cannot make a {granularity.name} adapter ({lo:,}-{hi:,} parameters) on profile "
            f"{profile.name!r}: {why}; choose another rank or granularity"
        )
    order = {m: i for i, m in enumerate(profile.module_names)}
    return sorted(chosen, key=order.__getitem__)


def granularity_of(num_parameters: int) -> AdapterGranularity:
    """The granularity whose range holds ``num_parameters`` (below NANO's floor counts as NANO)."""
    for g in AdapterGranularity:
        lo, hi = g.param_range
        if num_parameters <= hi:
            return g
    return AdapterGranularity.LARGE
