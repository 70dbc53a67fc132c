"""LoRA weights: per-module factor pairs, their scaling, validation and (de)serialisation.

For a targeted linear module with weight ``W`` (``d_out x d_in``), an adapter holds ``A`` (``r x d_in``) and
``B`` (``d_out x r``); the adapted layer computes ``y = W x + s * B (A x)`` with ``s = alpha / r``::

    x ──► W ──────────────┐
    │                     ▼
    └──► A (r x d_in) ─► B (d_out x r) ─► * s ─► (+) ─► y

Standard LoRA init: ``A`` Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear`` and PEFT), ``B`` zero, so a
fresh adapter changes nothing until trained. Weights serialise to safetensors (never pickle) with keys
``"<module>.lora_A"`` / ``"<module>.lora_B"`` and ``alpha`` / ``rank`` in the header metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.safetensors_io import FORMAT, _header, check_stored_bytes, encode_safetensors  # noqa: F401 (re-exported)
from smoa.errors import CorruptAdapterError, InvalidAdapterError, NonFiniteWeightsError, ProfileMismatchError

MAX_DELTA_ABS = 1e6  # largest |alpha / r * (B @ A)[i, j]| accepted: a sanity cap (real LoRA deltas are << 1)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class LoraWeights:
    """The factors of one LoRA adapter.

    Attributes:
        factors: module name -> ``(A, B)`` with ``A: [r, d_in]`` and ``B: [d_out, r]``.
        alpha: LoRA alpha; the update of every module is scaled by ``alpha / rank``.
        rank: the shared rank ``r`` of every factor pair.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    # Read-only mapping view: ``weights[module] -> (A, B)``, ``for module in weights``, ``weights.items()``.
    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __contains__(self, module: object) -> bool:
        return module in self.factors

    def keys(self) -> KeysView[str]:
        return self.factors.keys()

    def items(self) -> ItemsView[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.factors.items()

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())

    def delta(self, module: str) -> torch.Tensor:
        """Dense update ``s * B @ A`` (``[d_out, d_in]``) of one module — for tests and small shapes only."""
        a, b = self.factors[module]
        return self.scaling * (b @ a)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoraWeights:
        return LoraWeights(
            {m: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)) for m, (a, b) in self.factors.items()},
            self.alpha,
            self.rank,
        )

    def clone(self) -> LoraWeights:
        return LoraWeights({m: (a.clone(), b.clone()) for m, (a, b) in self.factors.items()}, self.alpha, self.rank)

    def _check_scalars(self, name: str) -> None:
        """Rank a positive int, alpha a positive finite number, at least one module."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise InvalidAdapterError(f"{name}: `rank` must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidAdapterError(f"{name}: `alpha` must be a positive finite number, got {self.alpha!r}")
        if not self.factors:
            raise InvalidAdapterError(f"{name}: no target modules (empty `weights`)")

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self, profile: BaseProfile, *, name: str = "adapter") -> None:
        """Check names, shapes, dtypes and finiteness against ``profile``; every problem in one error."""
        problems: list[str] = []
        self._check_scalars(name)
        non_finite: list[str] = []
        for module, pair in self.factors.items():
            if not isinstance(module, str) or module not in profile:
                problems.append(f"module {module!r} is not in profile {profile.name!r}")
                continue
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
                problems.append(f"module {module!r}: expected a pair of tensors (A, B), got {type(pair).__name__}")
                continue
            a, b = pair
            d_in, d_out = profile.shape(module)
            if tuple(a.shape) != (self.rank, d_in):
                problems.append(f"module {module!r}: A has shape {tuple(a.shape)}, expected ({self.rank}, {d_in})")
            if tuple(b.shape) != (d_out, self.rank):
                problems.append(f"module {module!r}: B has shape {tuple(b.shape)}, expected ({d_out}, {self.rank})")
            for label, t in (("A", a), ("B", b)):
                if t.dtype not in _FLOAT_DTYPES:
                    problems.append(f"module {module!r}: {label} has dtype {t.dtype}, expected a float dtype")
                elif not bool(torch.isfinite(t).all()):
                    non_finite.append(f"{module}.{label}")
        if problems:
            raise ProfileMismatchError(f"{name} does not fit profile {profile.name!r}: " + "; ".join(problems))
        if non_finite:
            raise NonFiniteWeightsError(f"{name}: NaN or Inf in {', '.join(non_finite)}")
        self._check_delta_range(name)

    def check_values(self, *, name: str = "adapter") -> None:
        """The profile-free checks: rank, alpha, tensor pairs, float dtypes, finiteness and delta range.

        Raises:
            InvalidAdapterError: bad rank/alpha, a module that is not a pair of float tensors.
            NonFiniteWeightsError: NaN/Inf in a factor, or a delta entry beyond :data:`MAX_DELTA_ABS`.
        """
        self._check_scalars(name)
        non_finite: list[str] = []
        for module, pair in self.factors.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
                raise InvalidAdapterError(f"{name}: module {module!r}: expected a pair of tensors (A, B), got {type(pair).__name__}")
            for label, t in zip("AB", pair):
                if t.dtype not in _FLOAT_DTYPES:
                    raise InvalidAdapterError(f"{name}: module {module!r}: {label} has dtype {t.dtype}, expected a float dtype")
                if not bool(torch.isfinite(t).all()):
                    non_finite.append(f"{module}.{label}")
        if non_finite:
            raise NonFiniteWeightsError(f"{name}: NaN or Inf in {', '.join(non_finite)}")
        self._check_delta_range(name)

    def _check_delta_range(self, name: str) -> None:
        """Refuse a delta ``s * B @ A`` with an entry beyond :data:`MAX_DELTA_ABS` (or not finite).

        Cheap bound first (``s * r * max|A| * max|B|``, float64); only when it exceeds the limit is the exact
        maximum computed, one module at a time in float64.
        """
        s = float(self.alpha) / self.rank
        if not math.isfinite(s):
            raise NonFiniteWeightsError(f"{name}: scaling alpha / rank = {self.alpha!r} / {self.rank} is not finite")
        bad: list[str] = []
        for module, (a, b) in self.factors.items():
            if a.numel() == 0 or b.numel() == 0:
                continue
            bound = s * self.rank * float(a.detach().abs().max()) * float(b.detach().abs().max())
            if bound <= MAX_DELTA_ABS:
                continue
            exact = s * float((b.detach().double().abs() @ a.detach().double().abs()).max())  # >= max |entry|
            if not math.isfinite(exact) or exact > MAX_DELTA_ABS:
                peak = s * float((b.detach().double() @ a.detach().double()).abs().max())
                if not math.isfinite(peak) or peak > MAX_DELTA_ABS:
                    bad.append(f"{module} (max |delta| {peak:.3g})")
        if bad:
            raise NonFiniteWeightsError(
                f"{name}: alpha / rank * B @ A exceeds {MAX_DELTA_ABS:g} (a forward would overflow or be swamped) in "
                + ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            )

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """safetensors bytes (keys ``<module>.lora_A``/``.lora_B``), deterministic for equal weights.

        Encoded by :func:`encode_safetensors` (the format is a JSON header plus raw little-endian tensor bytes);
        decoded by the safetensors library itself, so every file we write is checked by the reference parser.
        """
        tensors: list[tuple[str, torch.Tensor]] = []
        for m, (a, b) in self.factors.items():
            tensors.append((f"{m}.lora_A", a))
            tensors.append((f"{m}.lora_B", b))
        return encode_safetensors(tensors, {"format": FORMAT, "alpha": repr(float(self.alpha)), "rank": str(self.rank)})

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "adapter") -> LoraWeights:
        """Parse bytes written by :meth:`to_bytes`. Raises :class:`CorruptAdapterError` on any defect."""
        from safetensors.torch import load  # the reference parser (Rust): never executes code

        check_stored_bytes(data, name=name)  # strict header checks first: a clean error for any torn/odd file
        try:
            tensors = load(bytes(data))
            header = _read_header(data)
            meta = dict(header.get("__metadata__", {}))
            alpha, rank = float(meta["alpha"]), int(meta["rank"])
        except Exception as exc:  # noqa: BLE001 - any parse failure is corruption
            raise CorruptAdapterError(f"{name}: stored weights do not parse ({type(exc).__name__}: {exc})") from None
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in header:  # header order = the order the factors were written in
            if key == "__metadata__":
                continue
            if key.endswith(".lora_A"):
                m = key[: -len(".lora_A")]
                if f"{m}.lora_B" not in tensors:
                    raise CorruptAdapterError(f"{name}: {m!r} has lora_A but no lora_B")
                factors[m] = (tensors[key], tensors[f"{m}.lora_B"])
            elif not key.endswith(".lora_B"):
                raise CorruptAdapterError(f"{name}: unexpected tensor {key!r}")
        if len(factors) * 2 != len(tensors):
            raise CorruptAdapterError(f"{name}: lora_B without lora_A")
        return cls(factors, alpha, rank)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _read_header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def checksum(data: bytes) -> str:
    """Content hash of serialised weights (sha256 hex)."""
    return hashlib.sha256(data).hexdigest()


def init_factor_a(n: int, rank: int, d_in: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """``n`` fresh ``A`` factors ``[n, rank, d_in]``, Kaiming-uniform(a=sqrt(5)) as ``nn.Linear`` and PEFT."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(n, rank, d_in, generator=generator, dtype=torch.float32) * 2 - 1).mul_(bound).to(dtype)


def init_lora(
    profile: BaseProfile,
    modules: Iterable[str],
    rank: int,
    alpha: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraWeights:
    """Fresh LoRA factors: ``A`` Kaiming-uniform(a=sqrt(5)) as PEFT, ``B`` zeros."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in modules:
        d_in, d_out = profile.shape(m)
        factors[m] = (init_factor_a(1, rank, d_in, generator, dtype)[0], torch.zeros(d_out, rank, dtype=dtype))
    return LoraWeights(factors, float(alpha), int(rank))


def weights_from_mapping(
    mapping: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | LoraWeights, alpha: float | None, *, name: str = "weights"
) -> LoraWeights:
    """Accept user-given weights (a :class:`LoraWeights` or ``{module: (A, B)}``); rank is read from A."""
    if isinstance(mapping, LoraWeights):
        return mapping
    if not isinstance(mapping, Mapping) or not mapping:
        raise InvalidAdapterError(f"`{name}` must be a non-empty mapping module -> (A, B), got {type(mapping).__name__}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = set()
    for m, pair in mapping.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise InvalidAdapterError(f"`{name}`[{m!r}] must be a pair of tensors (A, B), got {pair!r:.80}")
        a, b = pair
        if a.dim() != 2 or b.dim() != 2:
            raise ProfileMismatchError(f"`{name}`[{m!r}]: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
        ranks.add(int(a.shape[0]))
        factors[str(m)] = (a.detach().clone(), b.detach().clone())
    if len(ranks) != 1:
        raise ProfileMismatchError(f"`{name}`: all modules must share one rank, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    return LoraWeights(factors, float(alpha if alpha is not None else 2.0 * rank), rank)
