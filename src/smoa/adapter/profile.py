"""Base-model profiles: the names and shapes of the linear modules an adapter may target.

A profile is what an adapter is *for*: ``(module name, d_in, d_out)`` for every targetable linear layer of a
base model, in model order. It is built from a real ``torch.nn.Module`` (``nn.Linear`` and the ``Conv1D`` of
HF GPT-2 style models) or taken from the built-in default, which matches the project's default base model,
SmolLM2-135M (LlamaForCausalLM: 30 layers, hidden 576, 9 query heads / 3 key-value heads of 64, MLP 1536).

The profile's ``fingerprint`` (a hash of its modules) is stored with every adapter, so adapters made for
another model are recognised and refused instead of silently mis-applied.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from smoa.errors import ConfigError, ProfileMismatchError

DEFAULT_PROFILE_NAME = "smollm2-135m"
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class BaseProfile:
    """Targetable linear modules of a base model.

    Attributes:
        name: human-readable name (e.g. ``"smollm2-135m"``).
        modules: ``(module_name, d_in, d_out)`` triples in model order.
    """

    name: str
    modules: tuple[tuple[str, int, int], ...]
    _index: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, tuple[int, int]] = {}
        for entry in self.modules:
            mod_name, d_in, d_out = entry
            if mod_name in index:
                raise ConfigError(f"`modules` of profile {self.name!r} lists {mod_name!r} twice")
            index[mod_name] = (int(d_in), int(d_out))
        object.__setattr__(self, "_index", index)

    # -- lookups -----------------------------------------------------------------------------------------------
    def __contains__(self, module: str) -> bool:
        return module in self._index

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def module_names(self) -> list[str]:
        return [m for m, _, _ in self.modules]

    def shape(self, module: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of ``module``; raises :class:`ProfileMismatchError` when unknown."""
        try:
            return self._index[module]
        except KeyError:
            raise ProfileMismatchError(
                f"module {module!r} is not a linear module of profile {self.name!r} "
                f"(e.g. {', '.join(self.module_names[:3])}, ...)"
            ) from None

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable short hash of the module names and shapes (not of the name)."""
        h = hashlib.sha256(json.dumps([list(m) for m in self.modules]).encode()).hexdigest()
        return h[:16]

    def match(self, patterns: str | Sequence[str]) -> list[str]:
        """Module names matching PEFT-style ``target_modules``.

        A string is a full regular expression (as in PEFT); a list matches names equal to, ending with
        ``"." + item``, or fnmatch-ing an item.
        """
        if isinstance(patterns, str):
            rx = re.compile(patterns)
            return [m for m in self.module_names if rx.fullmatch(m)]
        pats = list(patterns)
        out = []
        for m in self.module_names:
            if any(m == p or m.endswith("." + p) or fnmatch.fnmatchcase(m, p) for p in pats):
                out.append(m)
        return out

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"name": self.name, "modules": [list(m) for m in self.modules]})

    @classmethod
    def from_json(cls, text: str) -> BaseProfile:
        data = json.loads(text)
        return cls(name=str(data["name"]), modules=tuple((str(m), int(i), int(o)) for m, i, o in data["modules"]))


def module_kind(module: str) -> str:
    """The module name with its layer index replaced by ``*`` (``model.layers.*.self_attn.v_proj``)."""
    return _LAYER_RE.sub(".*.", module, count=1)


def layer_index(module: str) -> int:
    """The first integer path component of ``module`` (its layer), or -1."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else -1


def profile_from_model(
    model: Any,
    name: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
) -> BaseProfile:
    """Read the targetable linear modules of a torch model.

    Args:
        model: any ``torch.nn.Module``; ``nn.Linear`` and transformers' ``Conv1D`` layers are collected.
        name: profile name; defaults to the model's ``config.name_or_path`` or class name.
        target_modules: optional PEFT-style filter (regex string or list of names/suffixes).
        exclude: module-name suffixes left out (the output head by default: it is vocabulary-sized).
    """
    import torch.nn as nn

    conv1d: tuple[type, ...] = ()
    try:  # transformers is a dependency, but keep plain-torch use import-light
        from transformers.pytorch_utils import Conv1D

        conv1d = (Conv1D,)
    except Exception:  # pragma: no cover - transformers missing
        pass
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    excl = tuple(exclude)
    modules: list[tuple[str, int, int]] = []
    for mod_name, module in model.named_modules():
        if any(mod_name == e or mod_name.endswith("." + e) for e in excl):
            continue
        if isinstance(module, nn.Linear):
            modules.append((mod_name, module.in_features, module.out_features))
        elif conv1d and isinstance(module, conv1d):
            d_in, d_out = module.weight.shape  # Conv1D stores (in, out)
            modules.append((mod_name, int(d_in), int(d_out)))
    if not modules:
        raise ProfileMismatchError(f"model {type(model).__name__} has no nn.Linear / Conv1D modules to target")
    profile = BaseProfile(name=name or _model_name(model), modules=tuple(modules))
    if target_modules is not None:
        keep = set(profile.match(target_modules))
        if not keep:
            raise ConfigError(f"`target_modules`={target_modules!r} matches no linear module of the model")
        profile = BaseProfile(name=profile.name, modules=tuple(m for m in modules if m[0] in keep))
    return profile


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    path = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return str(path) if path else type(model).__name__


def llama_profile(
    name: str, n_layers: int, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int, prefix: str = "model"
) -> BaseProfile:
    """Profile of a Llama-architecture model from its config numbers (no weights needed)."""
    head_dim = hidden // n_heads
    kv = n_kv_heads * head_dim
    mods: list[tuple[str, int, int]] = []
    for i in range(n_layers):
        p = f"{prefix}.layers.{i}"
        mods += [
            (f"{p}.self_attn.q_proj", hidden, hidden),
            (f"{p}.self_attn.k_proj", hidden, kv),
            (f"{p}.self_attn.v_proj", hidden, kv),
            (f"{p}.self_attn.o_proj", hidden, hidden),
            (f"{p}.mlp.gate_proj", hidden, intermediate),
            (f"{p}.mlp.up_proj", hidden, intermediate),
            (f"{p}.mlp.down_proj", intermediate, hidden),
        ]
    return BaseProfile(name=name, modules=tuple(mods))


def default_profile() -> BaseProfile:
    """Profile of SmolLM2-135M(-Instruct), the default base model (equal to ``profile_from_model`` on it)."""
    return llama_profile(DEFAULT_PROFILE_NAME, n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3)


def resolve_profile(value: Any) -> BaseProfile:
    """``None`` / ``"smollm2-135m"`` -> the default profile; a :class:`BaseProfile` is returned as is."""
    if value is None or value == DEFAULT_PROFILE_NAME:
        return default_profile()
    if isinstance(value, BaseProfile):
        return value
    raise ConfigError(f"`base_profile` must be a BaseProfile or {DEFAULT_PROFILE_NAME!r}, got {value!r}")
