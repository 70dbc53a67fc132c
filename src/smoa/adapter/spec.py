"""Adapter metadata: the request to create one (:class:`AdapterSpec`), its validation, and the entry returned.

:func:`validate_spec` is the one place a spec is checked; it returns a :class:`ValidatedSpec` (a subclass) with
every field in normal form, and passing a ``ValidatedSpec`` again returns it unchanged (validated once). Every
problem raises a :class:`~smoa.errors.SmoaError` subclass naming the field and showing the bad value — never a raw
``TypeError``, ``AttributeError`` or ``re.error``:

* tags go through :func:`smoa.adapter.tags.normalize_tags` (NFKC + casefold, invisible tags refused, duplicates
  dropped): the catalog stores their normal form;
* ``metadata`` may be ``None`` (= ``{}``) and hold ``None`` values (JSON ``null``); string values are capped at
  :data:`MAX_METADATA_VALUE_CHARS`, the whole at :data:`MAX_METADATA_BYTES` of JSON;
* ``target_modules`` is a full regular expression (compiled here) or a list of names;
* ``alpha`` is positive, finite and at most :data:`MAX_ALPHA`; given ``weights`` are parsed into
  :class:`~smoa.adapter.weights.LoraWeights` and their values checked (finite, every delta entry
  ``|alpha / r * B @ A|`` at most :data:`~smoa.adapter.weights.MAX_DELTA_ABS`).

The base-model-profile checks (module names and shapes) need the profile and happen in the core
(:meth:`LoraWeights.validate`, :func:`plan_modules`); the granularity of a stored adapter is always derived from
its real parameter count (:func:`plan_modules`), never taken from the request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from smoa.adapter.tags import MAX_TAG_CHARS, MAX_TAGS, normalize_tags
from smoa.config import AdapterGranularity, AdapterSpecialization, coerce_enum
from smoa.errors import ConfigError, InvalidAdapterError, InvalidInputError

if TYPE_CHECKING:
    import torch

    from smoa.adapter.profile import BaseProfile
    from smoa.adapter.weights import LoraWeights

MAX_DESCRIPTION_CHARS = 16_384
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
MAX_METADATA_KEY_CHARS = 256
MAX_METADATA_VALUE_CHARS = 16_384
MAX_EXAMPLES = 10_000
MAX_EXAMPLE_CHARS = 16_384
MAX_ID_CHARS = 256
MAX_RANK = 4096
MAX_ALPHA = 1e6
MAX_TARGET_PATTERN_CHARS = 4_096
MAX_TARGET_MODULES = 4_096


@dataclass
class AdapterSpec:
    """A request to create one adapter (checked by :func:`validate_spec`).

    Attributes:
        specialization: DOMAIN / SKILL / TASK / CUSTOM, or COMPOSITE (then ``members`` is required).
        domain_tags, skill_tags: routing tags (stored in normal form, see :mod:`smoa.adapter.tags`).
        granularity: size class used to *choose* modules for fresh weights when ``target_modules`` is not given;
            the stored granularity is always derived from the real parameter count.
        rank: LoRA rank of fresh weights (given ``weights`` carry their own rank).
        alpha: LoRA alpha (``None``: ``default_alpha_ratio * rank``).
        description, examples: routing texts.
        weights: trained factors (:class:`LoraWeights` or ``{module: (A, B)}``); ``None`` = fresh init.
        target_modules: a full regular expression or a list of module names (PEFT style).
        metadata: free JSON-serialisable data (``None`` = none).
        pinned: protected from pruning, kept loaded.
        members: COMPOSITE only, ``[(adapter_id, weight), ...]``.
    """

    specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM
    domain_tags: Sequence[str] = ()
    skill_tags: Sequence[str] = ()
    granularity: AdapterGranularity | str = AdapterGranularity.NANO
    rank: int = 2
    alpha: float | None = None
    description: str = ""
    examples: Sequence[str] | None = ()
    weights: LoraWeights | Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    target_modules: Sequence[str] | str | None = None
    metadata: Mapping[str, Any] | None = field(default_factory=dict)
    pinned: bool = False
    members: Sequence[tuple[str, float]] | None = None  # COMPOSITE only


@dataclass
class ValidatedSpec(AdapterSpec):
    """An :class:`AdapterSpec` returned by :func:`validate_spec`: enums coerced, tags normalised, metadata a plain
    JSON-safe dict, ``examples`` a list, ``weights`` a :class:`LoraWeights` (or ``None``), ``target_modules`` a
    ``str``, a ``list`` or ``None``."""


def is_unicode(text: str) -> bool:
    """False for strings SQLite and JSON cannot store (lone surrogates such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def spec_from_mapping(value: AdapterSpec | Mapping[str, Any], where: str = "") -> AdapterSpec:
    """An :class:`AdapterSpec` from a spec or a mapping of its fields (unknown field names refused)."""
    p = f"{where}: " if where else ""
    if isinstance(value, AdapterSpec):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{p}expected an AdapterSpec or a mapping, got {type(value).__name__}")
    known = {f.name for f in fields(AdapterSpec)}
    bad = sorted(repr(k) for k in value if k not in known)
    if bad:
        raise InvalidInputError(f"{p}unknown field(s) {bad}; known: {sorted(known)}")
    return AdapterSpec(**value)


def _check_metadata(p: str, metadata: Any) -> dict[str, Any]:
    """JSON-safe copy of ``metadata`` (``None`` -> ``{}``) with keys, values, depth and size capped."""
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping) and not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{p}`metadata` must be a mapping with string keys (or None), got {metadata!r:.100}")
    stack: list[tuple[Any, int, str]] = [(metadata, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, Mapping):
            items: list[tuple[Any, Any]] = list(value.items())
            for k, _ in items:
                if not isinstance(k, str) or len(k) > MAX_METADATA_KEY_CHARS or not is_unicode(k):
                    raise InvalidInputError(
                        f"{p}`metadata` keys (at {path!r}) must be strings of at most {MAX_METADATA_KEY_CHARS} "
                        f"characters, got {k!r:.100}"
                    )
        elif isinstance(value, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
                raise InvalidInputError(
                    f"{p}`metadata` value at {path!r} is {len(value):,} characters; metadata string values hold at "
                    f"most {MAX_METADATA_VALUE_CHARS:,}: {value[:60]!r}..."
                )
            continue
        if depth > MAX_METADATA_DEPTH:
            raise InvalidInputError(f"{p}`metadata` is nested more than {MAX_METADATA_DEPTH} levels deep")
        stack.extend((v, depth + 1, f"{path}.{k}".lstrip(".")[:200]) for k, v in items)
    try:
        text = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(f"{p}`metadata` must be JSON-serialisable UTF-8: {str(exc)[:200]}") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise InvalidInputError(f"{p}`metadata` is {len(raw):,} bytes of JSON; at most {MAX_METADATA_BYTES:,} allowed")
    out: dict[str, Any] = json.loads(text)
    return out


def _check_text(p: str, name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit or "\x00" in value or not is_unicode(value):
        raise InvalidInputError(
            f"{p}`{name}` must be a string of at most {limit:,} characters without NUL or lone surrogates, "
            f"got {value!r:.100}"
        )
    return value


def _check_examples(p: str, examples: Any) -> list[str]:
    if examples is None:
        return []
    if isinstance(examples, (str, bytes)) or not isinstance(examples, (list, tuple)):
        raise InvalidInputError(f"{p}`examples` must be a list of strings, got {examples!r:.100}")
    if len(examples) > MAX_EXAMPLES:
        raise InvalidInputError(f"{p}`examples` holds {len(examples):,} items; at most {MAX_EXAMPLES:,} allowed")
    for i, e in enumerate(examples):
        if not isinstance(e, str) or len(e) > MAX_EXAMPLE_CHARS or "\x00" in e or not is_unicode(e):
            raise InvalidInputError(
                f"{p}`examples` item {i} must be a string of at most {MAX_EXAMPLE_CHARS:,} characters without NUL or "
                f"lone surrogates, got {e!r:.100}"
            )
    return list(examples)


def check_target_modules(value: Any, where: str = "") -> str | list[str] | None:
    """``target_modules`` as a compiled-checked regex string, a list of names, or ``None``.

    Raises:
        InvalidInputError: not a str / list of str, too long, or a regex that does not compile (``"("``).
    """
    p = f"{where}: " if where else ""
    if value is None:
        return None
    if isinstance(value, str):
        if not value or len(value) > MAX_TARGET_PATTERN_CHARS or not is_unicode(value):
            raise InvalidInputError(
                f"{p}`target_modules` must be a non-empty regular expression of at most "
                f"{MAX_TARGET_PATTERN_CHARS:,} characters, got {value!r:.100}"
            )
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise InvalidInputError(f"{p}`target_modules`={value!r:.100} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple)) and not isinstance(value, bytes):
        if not value or len(value) > MAX_TARGET_MODULES:
            raise InvalidInputError(f"{p}`target_modules` must list 1-{MAX_TARGET_MODULES:,} module names, got {len(value)}")
        for m in value:
            if not isinstance(m, str) or not m or len(m) > MAX_TAG_CHARS or not is_unicode(m):
                raise InvalidInputError(f"{p}`target_modules` items must be non-empty module names, got {m!r:.100}")
        return list(value)
    raise InvalidInputError(
        f"{p}`target_modules` must be a regular expression (str), a list of module names or None, got "
        f"{value!r:.100} ({type(value).__name__})"
    )


def check_alpha(alpha: Any, where: str = "") -> float | None:
    """``alpha`` as a float in ``(0, MAX_ALPHA]`` (or ``None``)."""
    p = f"{where}: " if where else ""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise InvalidInputError(f"{p}`alpha` must be a positive finite number of at most {MAX_ALPHA:g}, got {alpha!r:.100}")
    return float(alpha)


def coerce_weights(value: Any, alpha: float | None = None, *, name: str = "weights") -> LoraWeights:
    """User-given weights as :class:`LoraWeights` with their values checked (no profile needed).

    Accepts a :class:`LoraWeights` or ``{module: (A, B)}`` (rank read from ``A``); ``alpha`` overrides theirs.

    Raises:
        InvalidAdapterError: wrong types or shapes (:class:`~smoa.errors.ProfileMismatchError` for shapes).
        NonFiniteWeightsError: NaN/Inf in a factor, or a delta ``alpha / r * B @ A`` that is not finite or
            exceeds :data:`~smoa.adapter.weights.MAX_DELTA_ABS`.
    """
    from smoa.adapter.weights import LoraWeights, weights_from_mapping

    if not isinstance(value, (LoraWeights, Mapping)):
        raise InvalidAdapterError(
            f"`{name}` must be LoraWeights or a mapping module -> (A, B) of tensors, got {type(value).__name__}"
        )
    weights = weights_from_mapping(value, alpha, name=name)
    if alpha is not None and weights.alpha != alpha:
        weights = LoraWeights(weights.factors, float(alpha), weights.rank)
    weights.check_values(name=f"`{name}`")
    return weights


def _check_members(p: str, specialization: AdapterSpecialization, members: Any) -> list[tuple[str, float]] | None:
    if specialization is not AdapterSpecialization.COMPOSITE:
        if members:
            raise InvalidInputError(
                f"{p}`members` is only for COMPOSITE adapters (got specialization {specialization.value!r})"
            )
        return None
    if not members or isinstance(members, (str, bytes)) or not isinstance(members, (list, tuple)):
        raise InvalidInputError(f"{p}a COMPOSITE adapter needs `members` [(adapter_id, weight), ...], got {members!r:.100}")
    out = []
    for m in members:
        if not (isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], str) and len(m[0]) <= MAX_ID_CHARS
                and isinstance(m[1], (int, float)) and not isinstance(m[1], bool) and math.isfinite(m[1])):  # fmt: skip
            raise InvalidInputError(f"{p}`members` items must be (adapter_id: str, weight: float), got {m!r:.100}")
        out.append((m[0], float(m[1])))
    return out


def validate_spec(spec: AdapterSpec | Mapping[str, Any], where: str = "") -> ValidatedSpec:
    """Check and normalise every field of ``spec`` (module docstring); a :class:`ValidatedSpec` is returned as is.

    Args:
        spec: an :class:`AdapterSpec` or a mapping of its fields.
        where: prefix for error messages (``"adapter 3"`` in a bulk call).

    Raises:
        InvalidInputError: a field is invalid (the message names it and shows the value).
        InvalidAdapterError: ``weights`` are not valid LoRA factors (NaN, overflowing delta, wrong types ...).
    """
    if isinstance(spec, ValidatedSpec):
        return spec
    spec = spec_from_mapping(spec, where)
    p = f"{where}: " if where else ""
    try:
        specialization = coerce_enum(AdapterSpecialization, spec.specialization, "specialization")
        granularity = coerce_enum(AdapterGranularity, spec.granularity, "granularity")
    except ConfigError as exc:
        raise InvalidInputError(p + str(exc)) from None
    if not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or not 1 <= spec.rank <= MAX_RANK:
        raise InvalidInputError(f"{p}`rank` must be an int in [1, {MAX_RANK}], got {spec.rank!r:.100}")
    alpha = check_alpha(spec.alpha, where)
    description = _check_text(p, "description", spec.description, MAX_DESCRIPTION_CHARS)
    examples = _check_examples(p, spec.examples)
    metadata = _check_metadata(p, spec.metadata)
    if not isinstance(spec.pinned, bool):
        raise InvalidInputError(f"{p}`pinned` must be a bool, got {spec.pinned!r:.100}")
    members = _check_members(p, specialization, spec.members)
    try:
        domain_tags = normalize_tags(spec.domain_tags, "domain_tags")
        skill_tags = normalize_tags(spec.skill_tags, "skill_tags")
    except InvalidInputError as exc:
        raise InvalidInputError(p + str(exc)) from None
    target_modules = check_target_modules(spec.target_modules, where)
    weights = None
    if spec.weights is not None:
        if members is not None:
            raise InvalidInputError(f"{p}a COMPOSITE adapter takes `members`, not `weights`")
        try:
            weights = coerce_weights(spec.weights, alpha, name="weights")
        except InvalidAdapterError as exc:
            raise type(exc)(p + str(exc)) from None
    return ValidatedSpec(
        specialization=specialization, domain_tags=domain_tags, skill_tags=skill_tags, granularity=granularity,
        rank=weights.rank if weights is not None else spec.rank, alpha=alpha, description=description,
        examples=examples, weights=weights, target_modules=target_modules, metadata=metadata, pinned=spec.pinned,
        members=members,
    )  # fmt: skip


def plan_modules(profile: BaseProfile, spec: AdapterSpec) -> tuple[list[str], AdapterGranularity, int]:
    """Modules, granularity and exact parameter count of a *fresh* adapter for ``spec`` on ``profile``.

    Explicit ``target_modules`` are matched on the profile (PEFT semantics); otherwise the granularity chooses
    (:func:`smoa.adapter.granularity.select_modules`). The returned granularity is derived from the real count:
    ``target_modules=".*"`` at rank 2 on SmolLM2-135M is 610,560 parameters, SMALL — not the requested NANO.

    Raises:
        InvalidInputError: the modules match nothing, or no module set fits the granularity at this rank.
    """
    from smoa.adapter.granularity import granularity_of, lora_param_count, select_modules

    tm = check_target_modules(spec.target_modules)
    granularity = coerce_enum(AdapterGranularity, spec.granularity, "granularity")
    if tm is not None:
        modules = profile.match(tm)
        if not modules:
            raise InvalidInputError(f"`target_modules`={tm!r:.100} matches no module of profile {profile.name!r}")
    else:
        modules = select_modules(profile, granularity, spec.rank)
    count = lora_param_count(profile, modules, spec.rank)
    return modules, granularity_of(count), count




@dataclass(slots=True)
class Adapter:
    """One library entry: a snapshot of its catalog row (changing it changes nothing in the library).

    Attributes:
        id: generated id (``"ad_"`` + 16 hex digits); never derived from user strings or file names.
        key: internal integer key (catalog row id; the routing index's id).
        specialization, granularity, rank, alpha: what the adapter is.
        domain_tags, skill_tags: routing tags, stored exactly as given.
        description: free text used for routing.
        target_modules: the profile modules it adapts (model order).
        num_parameters: exact trainable-parameter count.
        profile: fingerprint of the base-model profile it was made for.
        version: bumped each time its weights change; caches key on (id, version).
        checksum: sha256 of its serialised weights.
        members: for COMPOSITE adapters, ``(member id, weight)`` pairs.
        status: ``"active"``, ``"archived"`` (weights in cold storage, restorable) or ``"merged"`` (merged into
            another adapter, which its id now aliases; weights kept so the merge can be undone).
    """

    id: str
    key: int
    specialization: AdapterSpecialization
    granularity: AdapterGranularity
    rank: int
    alpha: float
    domain_tags: list[str]
    skill_tags: list[str]
    description: str
    target_modules: list[str]
    num_parameters: int
    profile: str
    version: int
    checksum: str
    created_at: float
    last_used_at: float | None = None
    usage_count: int = 0
    pinned: bool = False
    status: str = "active"
    members: list[tuple[str, float]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    last_used_query: int = 0  # library query counter at its latest use (0: never used)
    created_query: int = 0  # library query counter when it was created
    examples: list[str] = field(default_factory=list)  # routing texts (with tags and description)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def tags(self) -> list[str]:
        return [*self.domain_tags, *self.skill_tags]

    @property
    def is_composite(self) -> bool:
        return self.specialization is AdapterSpecialization.COMPOSITE


__all__ = [
    "MAX_ALPHA", "MAX_DESCRIPTION_CHARS", "MAX_EXAMPLES", "MAX_ID_CHARS", "MAX_METADATA_BYTES", "MAX_METADATA_DEPTH",
    "MAX_METADATA_VALUE_CHARS", "MAX_TAGS", "MAX_TAG_CHARS", "Adapter", "AdapterSpec", "ValidatedSpec",
    "check_alpha", "check_target_modules", "coerce_weights", "is_unicode", "plan_modules", "spec_from_mapping",
    "validate_spec",
]  # fmt: skip
