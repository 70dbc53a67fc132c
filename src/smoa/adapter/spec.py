"""Adapter metadata as the library returns it (the weights live apart, see :mod:`smoa.adapter.weights`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smoa.config import AdapterGranularity, AdapterSpecialization


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

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def tags(self) -> list[str]:
        return [*self.domain_tags, *self.skill_tags]

    @property
    def is_composite(self) -> bool:
        return self.specialization is AdapterSpecialization.COMPOSITE
