"""From per-request mixtures to per-module kernel plans.

A *mixture* is one request's adapters and mixing weights::

    Mixture = list[(LoraWeights, weight)] or list[(key, LoraWeights, weight)]     # [] = the base model

The optional ``key`` (any hashable, e.g. ``(adapter_id, version)``) names the adapter's content: two
``LoraWeights`` objects under one key are taken to hold equal factors, so a reloaded copy reuses the stacks
built for the first. Without a key the object's identity is used (records hold only weak references and vanish
with the object, so a recycled id never hits a stale record). Either way the tensors' in-place version counters are part of the key,
so weights edited in place (an optimiser step) are restacked.

For a batch, :class:`MixtureState` deduplicates the rows' mixtures and, for every targeted module touched by
some mixture, builds one plan:

* :class:`SharedPlan` - one mixture for the whole batch (any batch size): the fast path.
* :class:`GroupPlan` - at most ``max_segments`` distinct mixtures: SGMV, one matmul pair per group of rows.
* :class:`GatherPlan` - many distinct mixtures: BGMV, one gathered ``bmm`` pair for the batch.

Concatenated factors (weights and scalings folded into ``A``) are cached per mixture in a byte-bounded LRU
(:class:`FactorCache`). When a factor requires grad, nothing is cached and plans are rebuilt in every forward
from the live tensors, so gradients reach the adapters' factors.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights
from smoa.errors import InvalidInputError
from smoa.inject.kernels import Group, bgmv_indices, concat_factors, lora_bgmv, lora_sgmv, lora_shared, pad_stack

MixtureItem = Union[tuple[LoraWeights, float], tuple[Hashable, LoraWeights, float]]
Mixture = list[MixtureItem]
Factors = tuple[torch.Tensor, torch.Tensor]
KERNELS = ("auto", "shared", "sgmv", "bgmv")


@dataclass(frozen=True)
class Entry:
    """One adapter of a normalised mixture: its cache key, weights and mixing weight."""

    key: Hashable
    weights: LoraWeights
    weight: float


NormMixture = tuple[Entry, ...]


# -- normalisation -----------------------------------------------------------------------------------------------
def _is_item(obj: Any) -> bool:
    return isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[-2], LoraWeights)


def _version(weights: LoraWeights) -> int:
    return sum(a._version + b._version for a, b in weights.factors.values())


def normalize_mixture(mixture: Any, where: str = "mixture") -> NormMixture:
    """Check one mixture and return its entries (zero weights dropped: they add exact zeros).

    Raises:
        InvalidInputError: an item is not ``(LoraWeights, w)`` / ``(key, LoraWeights, w)`` or ``w`` is not finite.
    """
    if mixture is None:
        return ()
    if not isinstance(mixture, (list, tuple)):
        raise InvalidInputError(
            f"`{where}` must be a list of (LoraWeights, weight) pairs, got {type(mixture).__name__}"
        )
    entries: list[Entry] = []
    for i, item in enumerate(mixture):
        if not _is_item(item):
            raise InvalidInputError(
                f"`{where}[{i}]` must be (LoraWeights, weight) or (key, LoraWeights, weight), got {item!r:.100}"
            )
        weights, w = item[-2], item[-1]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidInputError(f"`{where}[{i}]` mixing weight must be a finite number, got {w!r}")
        if w == 0:
            continue
        base_key = ("key", item[0]) if len(item) == 3 else ("id", id(weights))
        entries.append(Entry((base_key, _version(weights)), weights, float(w)))
    return tuple(entries)


def normalize_batch(mixtures: Any) -> tuple[NormMixture | None, list[NormMixture] | None]:
    """Split ``mixtures`` into a shared mixture or per-row mixtures.

    A flat list of items (or ``[]`` / ``None``) is one mixture shared by every row; a list of lists is one
    mixture per row (``[]`` = that row runs the base model).

    Returns:
        ``(shared, None)`` or ``(None, rows)``.
    """
    if mixtures is None or (isinstance(mixtures, (list, tuple)) and len(mixtures) == 0):
        return (), None
    if not isinstance(mixtures, (list, tuple)):
        raise InvalidInputError(
            f"`mixtures` must be a list (one mixture, or one per row), got {type(mixtures).__name__}"
        )
    if all(_is_item(m) for m in mixtures):
        return normalize_mixture(mixtures, "mixtures"), None
    return None, [normalize_mixture(m, f"mixtures[{r}]") for r, m in enumerate(mixtures)]


def mixture_key(mix: NormMixture) -> tuple[Hashable, ...]:
    return tuple((e.key, e.weight) for e in mix)


def needs_grad(mixes: Sequence[NormMixture]) -> bool:
    return any(t.requires_grad for mix in mixes for e in mix for pair in e.weights.factors.values() for t in pair)


# -- caches --------------------------------------------------------------------------------------------------------
class FactorCache:
    """Byte-bounded LRU: mixture key -> ``{module: (A_cat, B_cat)}`` on the model's device and dtype.

    Also remembers which adapters passed validation against the profile (bounded by ``max_validated``).
    Nothing here keeps a ``LoraWeights`` alive: identity-keyed records hold weak references and are dropped as
    soon as their weights are garbage-collected (so a recycled ``id`` can never hit a stale record); records
    under a caller's key hold no reference at all (the key vouches for the content).
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024, max_validated: int = 65536) -> None:
        if max_bytes < 0:
            raise InvalidInputError(f"`max_bytes` must be >= 0, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self.max_validated = int(max_validated)
        self._entries: OrderedDict[Hashable, tuple[dict[str, Factors], int, tuple[Any, ...]]] = OrderedDict()
        self._validated: OrderedDict[Hashable, tuple[Any, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _refs(self, entries: Sequence[Entry], store: str, key: Hashable) -> tuple[Any, ...]:
        """Weak references to the identity-keyed weights; each drops ``key`` from ``store`` when they die."""
        refs = []
        for e in entries:
            if e.key[0][0] == "id":
                refs.append(weakref.ref(e.weights, lambda _r, s=store, k=key: self._forget(s, k)))
        return tuple(refs)

    def _forget(self, store: str, key: Hashable) -> None:
        if store == "validated":
            self._validated.pop(key, None)
            return
        gone = self._entries.pop(key, None)
        if gone is not None:
            self.bytes -= gone[1]

    def validate(self, entry: Entry, profile: BaseProfile) -> None:
        """Validate an adapter once per key (raises ProfileMismatchError / NonFiniteWeightsError)."""
        if entry.key in self._validated:
            self._validated.move_to_end(entry.key)
            return
        entry.weights.validate(profile, name=f"adapter {entry.key[0][1]!r}" if entry.key[0][0] == "key" else "adapter")
        self._validated[entry.key] = self._refs([entry], "validated", entry.key)
        while len(self._validated) > self.max_validated:
            self._validated.popitem(last=False)

    def get(self, key: Hashable, build: Callable[[], dict[str, Factors]], mix: NormMixture) -> dict[str, Factors]:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0]
        self.misses += 1
        factors = build()
        size = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
        if size <= self.max_bytes:
            self._entries[key] = (factors, size, self._refs(mix, "entries", key))
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, old, _) = self._entries.popitem(last=False)
                self.bytes -= old
        return factors

    def clear(self, validated: bool = True) -> None:
        """Drop every stacked entry (and, unless ``validated=False``, the record of validated adapters)."""
        self._entries.clear()
        if validated:
            self._validated.clear()
        self.bytes = 0

    def info(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}


def build_mixture_factors(
    mix: NormMixture, placement: Callable[[str], tuple[torch.device, torch.dtype]], only: str | None = None
) -> dict[str, Factors]:
    """``{module: (A_cat, B_cat)}`` for every module any adapter of ``mix`` targets (see :func:`concat_factors`).

    Args:
        mix: the mixture's entries.
        placement: module -> ``(device, dtype)`` the factors are moved to.
        only: build this one module only.
    """
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for e in mix:
        coef = e.weight * e.weights.scaling
        for module, (a, b) in e.weights.factors.items():
            if only is not None and module != only:
                continue
            device, dtype = placement(module)
            per_module.setdefault(module, []).append((a.to(device, dtype), b.to(device, dtype), coef))
    return {m: concat_factors(pairs) for m, pairs in per_module.items()}


# -- module plans --------------------------------------------------------------------------------------------------
class ModulePlan:
    """How one module adds its rows' updates; ``apply`` works on ``x: [batch, ..., d_in]``."""

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, n: int) -> ModulePlan:
        """The plan for a batch whose every row was repeated ``n`` times in place (HF beam/sample expansion)."""
        raise NotImplementedError


def _rows3(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


@dataclass
class SharedPlan(ModulePlan):
    a: torch.Tensor  # [R, d_in]
    b: torch.Tensor  # [d_out, R]

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lora_shared(x, y, self.a, self.b)

    def expand(self, n: int) -> ModulePlan:
        return self


@dataclass
class GroupPlan(ModulePlan):
    groups: list[Group]

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lora_sgmv(_rows3(x), _rows3(y), self.groups).view(y.shape)

    def expand(self, n: int) -> ModulePlan:
        out: list[Group] = []
        for rows, a, b in self.groups:
            if isinstance(rows, slice):
                out.append((slice(rows.start * n, rows.stop * n), a, b))
            else:
                idx = (rows[:, None] * n + torch.arange(n, device=rows.device)).reshape(-1)
                out.append((idx, a, b))
        return GroupPlan(out)


class GatherPlan(ModulePlan):
    """BGMV over stacked slots; ``row_slots`` ``[batch]`` holds each row's slot or -1 (no adapter)."""

    def __init__(self, row_slots: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> None:
        self.row_slots = row_slots
        self.a_stack = a_stack  # [S, R, d_in]
        self.b_stack = b_stack  # [S, d_out, R]
        self.slot, self.rows = bgmv_indices(row_slots)  # resolved once, not in every forward

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lora_bgmv(_rows3(x), _rows3(y), self.a_stack, self.b_stack, self.slot, self.rows).view(y.shape)

    def expand(self, n: int) -> ModulePlan:
        return GatherPlan(self.row_slots.repeat_interleave(n), self.a_stack, self.b_stack)


def _row_groups(rows: list[int], device: torch.device) -> torch.Tensor | slice:
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def choose_kernel(kernel: str, n_slots: int, all_rows_one_slot: bool, max_segments: int) -> str:
    """``"shared"`` when one mixture covers every row, else SGMV for few mixtures and BGMV for many."""
    if kernel != "auto":
        return kernel
    if all_rows_one_slot:
        return "shared"
    return "sgmv" if n_slots <= max_segments else "bgmv"


def build_module_plan(
    row_slots: list[int], slot_factors: list[Factors], kernel: str, device: torch.device
) -> ModulePlan:
    """The plan of one module.

    Args:
        row_slots: per row, the index into ``slot_factors`` or -1 (this row's mixture leaves the module alone).
        slot_factors: ``(A_cat [R_s, d_in], B_cat [d_out, R_s])`` per distinct mixture touching the module.
        kernel: ``"shared"`` (requires one slot for every row), ``"sgmv"`` or ``"bgmv"``.
    """
    if kernel == "shared":
        if len(slot_factors) != 1 or any(s != 0 for s in row_slots):
            raise InvalidInputError("`kernel`='shared' needs one mixture on every row of the batch")
        return SharedPlan(*slot_factors[0])
    if kernel == "sgmv":
        members: dict[int, list[int]] = {}
        for r, s in enumerate(row_slots):
            if s >= 0:
                members.setdefault(s, []).append(r)
        return GroupPlan([(_row_groups(rows, device), *slot_factors[s]) for s, rows in members.items()])
    r_max = max(a.shape[0] for a, _ in slot_factors)
    a_stack = pad_stack([a for a, _ in slot_factors], 0, r_max)  # [S, R, d_in]
    b_stack = pad_stack([b for _, b in slot_factors], 1, r_max)  # [S, d_out, R]
    return GatherPlan(torch.tensor(row_slots, dtype=torch.long, device=device), a_stack, b_stack)


class MixtureState:
    """The mixtures of one batch, resolved into per-module plans (shared by every wrapped layer).

    Args:
        shared: one mixture for every row (any batch size), or ``None`` when ``rows`` is given.
        rows: one mixture per row.
        cache: stacking cache (ignored when a factor requires grad).
        placement: module name -> ``(device, dtype)`` of its base weight.
        kernel: ``"auto"``, ``"shared"``, ``"sgmv"`` or ``"bgmv"``.
        max_segments: with ``"auto"``, SGMV is used up to this many distinct mixtures, BGMV beyond.
    """

    def __init__(
        self,
        shared: NormMixture | None,
        rows: list[NormMixture] | None,
        cache: FactorCache,
        placement: Callable[[str], tuple[torch.device, torch.dtype]],
        kernel: str = "auto",
        max_segments: int = 4,
    ) -> None:
        if kernel not in KERNELS:
            raise InvalidInputError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
        self.batch_size = None if rows is None else len(rows)
        mixes = [shared] if rows is None else rows
        uniques: dict[Hashable, int] = {}
        self.uniques: list[NormMixture] = []
        self.row_mix: list[int] = []
        for mix in mixes:
            assert mix is not None
            if not mix:
                self.row_mix.append(-1)
                continue
            k = mixture_key(mix)
            if k not in uniques:
                uniques[k] = len(self.uniques)
                self.uniques.append(mix)
            self.row_mix.append(uniques[k])
        self.shared = rows is None
        self.kernel = kernel
        self.max_segments = max_segments
        self.placement = placement
        self.cache = cache
        self.lazy = needs_grad(self.uniques)
        self.touching: dict[str, list[int]] = {}  # module -> unique mixtures touching it
        for u, mix in enumerate(self.uniques):
            for m in sorted({m for e in mix for m in e.weights.factors}):
                self.touching.setdefault(m, []).append(u)
        self._plans: dict[str, ModulePlan] = {} if self.lazy else self._build_all()
        self._expanded: dict[int, dict[str, ModulePlan]] = {}

    @property
    def is_empty(self) -> bool:
        return not self.touching

    def _factors(self, u: int, only: str | None = None) -> dict[str, Factors]:
        mix = self.uniques[u]
        if self.lazy:
            return build_mixture_factors(mix, self.placement, only)
        placement_key = self.placement(next(iter(mix[0].weights.factors)))  # model moved -> new entries
        key = (mixture_key(mix), placement_key)
        return self.cache.get(key, lambda: build_mixture_factors(mix, self.placement), mix)

    def _build(self, module: str, factors: list[dict[str, Factors]]) -> ModulePlan:
        us = self.touching[module]
        slot_of = {u: i for i, u in enumerate(us)}
        row_slots = [slot_of.get(u, -1) if u >= 0 else -1 for u in self.row_mix]
        one = len(us) == 1 and all(s == 0 for s in row_slots)
        kernel = choose_kernel(self.kernel, len(us), one or self.shared, self.max_segments)
        if self.shared:
            kernel = "shared"
        device = self.placement(module)[0]
        return build_module_plan(row_slots, [factors[u][module] for u in us], kernel, device)

    def _build_all(self) -> dict[str, ModulePlan]:
        factors = [self._factors(u) for u in range(len(self.uniques))]
        return {m: self._build(m, factors) for m in self.touching}

    def plan_for(self, module: str, batch: int) -> ModulePlan | None:
        """The plan of ``module`` for an input of ``batch`` rows (``None``: no adapter touches it)."""
        if module not in self.touching:
            return None
        if self.lazy:  # rebuild from the live (trainable) factors in every forward
            factors = {u: self._factors(u, module) for u in self.touching[module]}
            plan = self._build(module, [factors.get(u, {}) for u in range(len(self.uniques))])
        else:
            plan = self._plans[module]
        if self.batch_size is None or batch == self.batch_size:
            return plan
        if self.batch_size and batch % self.batch_size == 0:
            n = batch // self.batch_size
            if self.lazy:
                return plan.expand(n)
            cached = self._expanded.setdefault(n, {})
            if module not in cached:
                cached[module] = plan.expand(n)
            return cached[module]
        raise InvalidInputError(
            f"input batch of {batch} rows does not match the {self.batch_size} per-row mixtures that are set"
        )

    def shared_factors(self) -> dict[str, Factors]:
        """``{module: (A_cat, B_cat)}`` when every row uses one mixture (for merging)."""
        if len(self.uniques) != 1 or any(u != 0 for u in self.row_mix):
            raise InvalidInputError("merging needs one mixture shared by every row; per-row mixtures are set")
        return self._factors(0)
