"""`SMoAConfig` and the enums of the public API.

Every field is validated in ``__post_init__``: an unknown field, a value of the wrong type or a value out of
range raises :class:`smoa.errors.ConfigError` naming the field in backticks and showing the bad value.
Enum fields accept the enum member or its name/value as a string (``"hybrid"``, ``"HYBRID"``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoa.errors import ConfigError


class AdapterSpecialization(str, enum.Enum):
    """What an adapter specialises in. COMPOSITE is an "adapter of adapters" (members + weights)."""

    DOMAIN = "domain"
    SKILL = "skill"
    TASK = "task"
    CUSTOM = "custom"
    COMPOSITE = "composite"


class AdapterGranularity(str, enum.Enum):
    """Size class of an adapter, by trainable-parameter count (inclusive ranges).

    ====== =======================
    NANO   1,000 – 10,000
    MICRO  10,001 – 100,000
    SMALL  100,001 – 1,000,000
    MEDIUM 1,000,001 – 10,000,000
    LARGE  10,000,001 and more
    ====== =======================
    """

    NANO = "nano"
    MICRO = "micro"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"

    @property
    def param_range(self) -> tuple[int, float]:
        """Inclusive (low, high) parameter counts of this granularity."""
        return _GRANULARITY_RANGES[self]


_GRANULARITY_RANGES: dict[AdapterGranularity, tuple[int, float]] = {
    AdapterGranularity.NANO: (1_000, 10_000),
    AdapterGranularity.MICRO: (10_001, 100_000),
    AdapterGranularity.SMALL: (100_001, 1_000_000),
    AdapterGranularity.MEDIUM: (1_000_001, 10_000_000),
    AdapterGranularity.LARGE: (10_000_001, math.inf),
}


class RoutingStrategy(str, enum.Enum):
    """How a query is matched to adapters."""

    SEMANTIC = "semantic"
    TASK_BASED = "task_based"
    HYBRID = "hybrid"
    HIERARCHICAL = "hierarchical"




@functools.lru_cache(maxsize=None)
def _by_text(enum_cls: Any) -> dict[str, Any]:
    """``enum_cls``' members by value and by lower-case name (a route coerces its strategy: a dict read, not a loop)."""
    out = {m.name.lower(): m for m in enum_cls}
    out.update({m.value: m for m in enum_cls if isinstance(m.value, str)})
    return out


def coerce_enum(enum_cls: Any, value: Any, field_name: str) -> Any:
    """Return ``value`` as a member of ``enum_cls``; accept members, values and names (any case)."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        member = _by_text(enum_cls).get(value.strip().lower())
        if member is not None:
            return member
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(f"`{field_name}` must be one of {allowed} (or {enum_cls.__name__}), got {value!r}")


@dataclass
class SMoAConfig:
    """Configuration of a :class:`smoa.SparseAdapterMixture`.

    The first block holds the fields of the original quick-start guide; the rest is what a persistent,
    bounded library needs. Defaults give an in-memory-bounded, temporary library on the default base-model
    profile (SmolLM2-135M).
    """

    # --- scale
    max_adapters: int = 1_000_000
    # --- routing
    routing_strategy: RoutingStrategy = RoutingStrategy.HYBRID
    max_active_adapters: int = 3
    routing_threshold: float | str = "auto"  # "auto": calibrated from the adapters' examples (smoa.routing.calibrate)
    routing_latency_budget_ms: float = 50.0  # fits int8 MiniLM on a 128-token text on 2 loaded cores (10-25 ms)
    enable_caching: bool = True
    # --- memory
    max_loaded_adapters: int = 100
    lazy_loading: bool = True
    enable_offloading: bool = False
    # --- optimisation
    enable_auto_merging: bool = True
    enable_auto_pruning: bool = True
    enable_auto_optimization: bool = False

    # --- storage (beyond the guide)
    storage_path: str | Path | None = None
    base_profile: Any = None  # BaseProfile | "smollm2-135m" | None (= default)
    cache_max_bytes: int = 256 * 1024 * 1024
    offload_max_bytes: int = 1024 * 1024 * 1024
    blob_inline_max_bytes: int = 1024 * 1024
    factor_cache_bytes: int = 256 * 1024 * 1024  # the engine's stacked-factor cache (per attached model)
    weights_path: str | None = None  # None: <storage_path>/weights; "s3://bucket/prefix": smoa.storage.s3
    # --- adapters
    default_alpha_ratio: float = 2.0  # alpha = ratio * rank unless given
    adapter_dtype: str = "float32"  # storage dtype of new adapters' factors: float32 | float16 | bfloat16
    seed: int | None = None
    # --- routing details
    encoder: str = "default"
    routing_temperature: float = 0.05
    routing_keys_per_adapter: int = 4  # P: most routing keys (k-means prototypes of its examples) per adapter
    routing_adapt_encoder: bool = True  # MiniLM encoders: optimize_library() trains a query LoRA (smoa.routing.adapt)
    # HYBRID over an HNSW index, full beam: the walk-free steps on a helper thread beside the walk (smoa.routing.side);
    # "auto": when the router measures it faster (smoa.routing.costs.SideChoice), True: always, False: never
    routing_parallel_side: bool | str = "auto"
    route_cache_size: int = 10_000
    embedding_cache_size: int = 10_000
    # --- optimisation details
    merge_similarity_threshold: float = 0.98
    merge_method: str = "svd"
    prune_after_queries: int = 1_000_000
    prune_after_seconds: float = 30 * 24 * 3600.0
    prune_action: str = "archive"
    auto_optimize_interval_s: float = 300.0
    # --- inference
    device: str = "cpu"

    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.routing_strategy = coerce_enum(RoutingStrategy, self.routing_strategy, "routing_strategy")
        for name, lo, hi in _INT_RANGES:
            _check_int(name, getattr(self, name), lo, hi)
        for name, lo, hi in _FLOAT_RANGES:
            if name == "routing_threshold" and self.routing_threshold == "auto":
                continue  # the calibrated default; any number in [-1, 1] overrides it
            setattr(self, name, _check_float(name, getattr(self, name), lo, hi))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")
        if not isinstance(self.routing_parallel_side, bool) and not (
            isinstance(self.routing_parallel_side, str) and self.routing_parallel_side == "auto"
        ):
            raise ConfigError(f"`routing_parallel_side` must be True, False or 'auto', got {self.routing_parallel_side!r}")
        if self.storage_path is not None:
            self.storage_path = _check_storage_path(self.storage_path)
        if self.weights_path is not None:  # an object store URL (issue 13); the backend checks the rest at open
            if not isinstance(self.weights_path, str) or "://" not in self.weights_path or "\x00" in self.weights_path:
                raise ConfigError(f"`weights_path` must be an object-store URL like 's3://bucket/prefix' or None, "
                                  f"got {self.weights_path!r}")  # fmt: skip
            if self.storage_path is None:
                raise ConfigError("`weights_path` needs a persistent `storage_path` (a temporary library's catalog "
                                  f"is deleted on close, its objects would be orphaned), got weights_path={self.weights_path!r}")  # fmt: skip
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"`seed` must be an int or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"`seed` must be in [0, 2**63 - 1], got {self.seed!r}")
        for name, allowed in (
            ("prune_action", ("archive", "delete")),
            ("merge_method", _MERGE_METHODS),
            ("adapter_dtype", ("float32", "float16", "bfloat16")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(f"`encoder` must be a non-empty string, got {self.encoder!r}")
        self.device = _check_device(self.device)
        if not isinstance(self.extra, dict):
            raise ConfigError(f"`extra` must be a dict, got {self.extra!r}")
        if self.base_profile is not None and not isinstance(self.base_profile, str):
            from smoa.adapter.profile import BaseProfile

            if not isinstance(self.base_profile, BaseProfile):
                raise ConfigError(
                    f"`base_profile` must be a BaseProfile, a profile name or None, got {self.base_profile!r}"
                )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SMoAConfig:
        """Build a config from keyword arguments, refusing unknown ones with a :class:`ConfigError`."""
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-value dict (enums as their values, paths as strings, profile by name)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, Path):
                v = str(v)
            elif f.name == "base_profile" and v is not None and not isinstance(v, str):
                v = v.name
            out[f.name] = v
        return out


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and numpy's default_rng both take it
MIN_OPTIMIZE_INTERVAL_S = 0.01  # `auto_optimize_interval_s`: 0 would be a busy loop
_MERGE_METHODS = ("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_INT_RANGES: tuple[tuple[str, int, float], ...] = (
    ("max_adapters", 1, 10**12),
    ("max_active_adapters", 1, 64),
    ("max_loaded_adapters", 1, 10**9),
    ("cache_max_bytes", 1, math.inf),
    ("offload_max_bytes", 0, math.inf),
    ("factor_cache_bytes", 0, math.inf),
    ("blob_inline_max_bytes", 0, math.inf),
    ("route_cache_size", 0, math.inf),
    ("embedding_cache_size", 0, math.inf),
    ("prune_after_queries", 1, math.inf),
    ("routing_keys_per_adapter", 1, 16),
)
_FLOAT_RANGES: tuple[tuple[str, float, float], ...] = (
    ("routing_threshold", -1.0, 1.0),
    ("routing_latency_budget_ms", 0.0, math.inf),
    ("default_alpha_ratio", 1e-6, 1e6),
    ("routing_temperature", 1e-6, 1e3),
    ("merge_similarity_threshold", -1.0, 1.0),
    ("prune_after_seconds", 0.0, math.inf),
    ("auto_optimize_interval_s", MIN_OPTIMIZE_INTERVAL_S, math.inf),
)
_BOOL_FIELDS = (
    "enable_caching",
    "routing_adapt_encoder",
    "lazy_loading",
    "enable_offloading",
    "enable_auto_merging",
    "enable_auto_pruning",
    "enable_auto_optimization",
)


_DEVICE_TYPES = ("cpu", "cuda", "mps")


def _check_device(value: Any) -> str:
    """``device`` as a canonical string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), checked against torch.

    Refused (ConfigError naming `device`): not a string, unparsable (``"bogus"``), a type smoa cannot run on
    (``"meta"``), or an accelerator this torch build or machine does not have (``"cuda"`` without CUDA, an
    index beyond the device count).
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"`device` must be a device string like 'cpu' or 'cuda', got {value!r}")
    text = value.strip().lower()
    if text == "cpu":
        return "cpu"
    import torch  # lazy: config is imported by light modules too

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"`device` must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}") from None
    if dev.type not in _DEVICE_TYPES:
        raise ConfigError(f"`device`={value!r}: smoa runs on {', '.join(_DEVICE_TYPES)}, not on {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"`device`={value!r} but CUDA is not available (this torch build or machine has no GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"`device`={value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"`device`={value!r} but MPS is not available on this machine")
    return str(dev)


def _check_storage_path(value: Any) -> Path | str:
    """``storage_path`` as an absolute :class:`Path` (a ``scheme://`` URL is kept as a string).

    Refused: not a str/Path, empty, NUL, or a path whose first existing ancestor is a file (``ConfigError``
    naming `storage_path`, never a raw ``FileExistsError`` later).
    """
    if not isinstance(value, (str, Path)) or str(value) == "" or "\x00" in str(value):
        raise ConfigError(f"`storage_path` must be a non-empty path or None, got {value!r}")
    if isinstance(value, str) and "://" in value:
        return value  # a backend URL (postgresql://...), resolved by smoa.storage.base
    path = Path(value).expanduser().absolute()  # finding 7: a later os.chdir must not move the library
    probe = path
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_file = probe.exists() and not probe.is_dir()
    except OSError:  # e.g. a parent we may not read: the open reports it, with its own clear StorageError
        return path
    if is_file:
        where = "is a file" if probe == path else f"lies under {str(probe)!r}, which is a file"
        raise ConfigError(f"`storage_path`={str(value)!r} {where}; it must be a directory (existing or new)")
    return path


def _check_int(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ConfigError(f"`{name}` must be in [{lo}, {hi}], got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
    if math.isnan(value) or not lo <= value <= hi:
        raise ConfigError(f"`{name}` must be in [{lo}, {hi}], got {value!r}")
    return float(value)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SMoAConfig))
_dataclass_init = SMoAConfig.__init__


@functools.wraps(_dataclass_init)
def _init_refusing_unknown(self: SMoAConfig, *args: Any, **kwargs: Any) -> None:
    unknown = sorted(set(kwargs) - _FIELD_NAMES)
    if unknown:
        shown = ", ".join(f"`{k}`={kwargs[k]!r}" for k in unknown)
        raise ConfigError(f"unknown SMoAConfig field(s): {shown}; known fields: {', '.join(sorted(_FIELD_NAMES))}")
    _dataclass_init(self, *args, **kwargs)


SMoAConfig.__init__ = _init_refusing_unknown  # type: ignore[method-assign]
