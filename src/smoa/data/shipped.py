"""The trained domain adapters shipped inside the package (``smoa/data/adapters/``).

``scripts/train_domain_adapters.py`` writes one safetensors file per domain (the same format as
:meth:`LoraWeights.to_bytes`) and a ``manifest.json`` describing them::

    {"format": "smoa-shipped-adapters/1", "base_model": ..., "profile_fingerprint": ..., "command": ...,
     "adapters": [{"name": "bbc-tech", "file": "bbc-tech.safetensors", "sha256": ..., "domain": "tech",
                   "domain_tags": [...], "skill_tags": [...], "description": ..., "routing_examples": [...],
                   "seed": 0, "steps": ..., "final_loss": ..., ...}, ...]}

:func:`load_shipped_adapters` checks every file against its sha256 and parses it with the safetensors library
(never pickle); :func:`shipped_specs` turns them into :class:`~smoa.library.AdapterSpec` for
``smoa.create_adapters_sync``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoa.adapter.weights import LoraWeights
from smoa.errors import CorruptAdapterError

FORMAT = "smoa-shipped-adapters/1"
MANIFEST = "manifest.json"


@dataclass
class ShippedAdapter:
    """One shipped adapter: its weights and what its manifest entry says about it."""

    name: str
    domain: str
    weights: LoraWeights
    domain_tags: list[str]
    skill_tags: list[str]
    description: str
    routing_examples: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def shipped_adapter_dir() -> Path:
    """``smoa/data/adapters`` inside the installed package."""
    return Path(__file__).resolve().parent / "adapters"


def read_manifest(folder: Path | None = None) -> dict[str, Any]:
    """The manifest as a dict.

    Raises:
        FileNotFoundError: no manifest (the adapters were not trained / shipped).
        CorruptAdapterError: not our format.
    """
    path = (folder or shipped_adapter_dir()) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptAdapterError(f"{str(path)!r} is not a `{FORMAT}` manifest (format {manifest.get('format')!r})")
    return manifest


def load_shipped_adapters(folder: Path | None = None, names: list[str] | None = None) -> list[ShippedAdapter]:
    """Load the shipped adapters (all, or those named), in manifest order, each checked against its sha256."""
    folder = folder or shipped_adapter_dir()
    manifest = read_manifest(folder)
    out = []
    for entry in manifest["adapters"]:
        if names is not None and entry["name"] not in names:
            continue
        data = (folder / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptAdapterError(f"shipped adapter {entry['name']!r}: {entry['file']!r} does not match its sha256")
        weights = LoraWeights.from_bytes(data, name=entry["name"])
        info = {k: v for k, v in entry.items() if k not in ("routing_examples",)}
        out.append(ShippedAdapter(
            name=entry["name"], domain=entry["domain"], weights=weights, domain_tags=list(entry["domain_tags"]),
            skill_tags=list(entry["skill_tags"]), description=entry["description"],
            routing_examples=list(entry["routing_examples"]), info=info,
        ))  # fmt: skip
    if names is not None and len(out) != len(set(names)):
        missing = sorted(set(names) - {a.name for a in out})
        raise CorruptAdapterError(f"shipped adapters {missing} are not in the manifest")
    return out


def shipped_specs(adapters: list[ShippedAdapter]) -> list[Any]:
    """:class:`~smoa.library.AdapterSpec` of each shipped adapter (DOMAIN, its tags, examples and weights)."""
    from smoa.library import AdapterSpec

    return [
        AdapterSpec(
            specialization="domain", domain_tags=a.domain_tags, skill_tags=a.skill_tags, description=a.description,
            examples=a.routing_examples, weights=a.weights, alpha=a.weights.alpha,
            metadata={"shipped": a.name, "domain": a.domain},
        )
        for a in adapters
    ]  # fmt: skip
