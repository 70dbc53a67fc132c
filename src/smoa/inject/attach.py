"""Attach mixtures to a model: wrap its targeted linear layers, set per-row mixtures, merge, detach.

::

    handle = attach(model, target_modules=["q_proj", "v_proj"])   # PEFT-style patterns
    handle.set_mixtures([[(w1, 0.5), (w2, 0.5)], [], [(w3, 1.0)]])  # one mixture per row; [] = base model
    model(input_ids)                                                 # 3 rows, each with its own mixture
    with handle.use([(w1, 1.0)]):                                    # one mixture for every row
        model.generate(...)
    handle.detach()                                                  # the original modules are back

Adapters are checked against the attached modules' profile the first time they are seen (wrong module
names or shapes: :class:`~smoa.errors.ProfileMismatchError`; NaN/Inf: :class:`~smoa.errors.NonFiniteWeightsError`);
nothing is ever silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from smoa.adapter.profile import BaseProfile, profile_from_model
from smoa.errors import ConfigError, InvalidInputError
from smoa.inject.layer import MixtureLinear, StateSlot
from smoa.inject.plan import KERNELS, FactorCache, MixtureState, NormMixture, normalize_batch


class MixtureHandle:
    """Controls the mixture layers attached to one model (made by :func:`attach`).

    Attributes:
        model: the model, modified in place.
        profile: the attached modules (names and shapes); adapters must fit it.
        layers: module name -> its :class:`MixtureLinear`.
        cache: the stacking cache (see :class:`~smoa.inject.plan.FactorCache`).
    """

    def __init__(
        self,
        model: nn.Module,
        profile: BaseProfile,
        layers: dict[str, MixtureLinear],
        originals: dict[str, nn.Module],
        frozen: dict[str, bool],
        kernel: str,
        cache: FactorCache,
        max_segments: int,
    ) -> None:
        self.model = model
        self.profile = profile
        self.layers = layers
        self.cache = cache
        self.kernel = kernel
        self.max_segments = max_segments
        self._originals = originals
        self._frozen = frozen
        self._state: MixtureState | None = None
        self._slot = next(iter(layers.values())).slot
        self._attached = True

    # -- mixtures ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> MixtureState | None:
        return self._state

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    def _placement(self, module: str) -> tuple[torch.device, torch.dtype]:
        w = self.layers[module].base_layer.weight
        return w.device, w.dtype

    def _check_live(self) -> None:
        if not self._attached:
            raise InvalidInputError("this handle was detached; call `attach(model)` again")

    def _resolve(self, mixtures: Any) -> MixtureState | None:
        shared, rows = normalize_batch(mixtures)
        mixes: list[NormMixture] = [shared] if rows is None else rows  # type: ignore[list-item]
        for mix in mixes:
            for entry in mix:
                self.cache.validate(entry, self.profile)
        if rows is None and not shared:
            return None
        state = MixtureState(shared, rows, self.cache, self._placement, self.kernel, self.max_segments)
        return None if state.is_empty and rows is None else state

    def set_mixtures(self, mixtures: Any) -> None:
        """Set what the next forwards apply.

        Args:
            mixtures: one mixture (a list of ``(LoraWeights, w)`` or ``(key, LoraWeights, w)``) for every row, or
                a list of such mixtures, one per row of the next batches (``[]`` = that row runs the base model).
                ``None`` or ``[]``: the base model. See :mod:`smoa.inject.plan` for the keys.

        Raises:
            InvalidInputError: malformed mixtures, or the handle is merged.
            ProfileMismatchError: an adapter names a module that is not attached or has the wrong shape.
            NonFiniteWeightsError: an adapter holds NaN or Inf.
        """
        self._check_live()
        if self.merged:
            raise InvalidInputError("cannot change mixtures while merged; call `unmerge()` first")
        state = self._resolve(mixtures)  # validate everything before touching the layers
        self._install(state)

    def _install(self, state: MixtureState | None) -> None:
        self._state = state
        self._slot.state = state  # every layer reads this one cell

    def clear(self) -> None:
        """Back to the base model (same as ``set_mixtures(None)``)."""
        self.set_mixtures(None)

    @contextmanager
    def use(self, mixtures: Any, merge: bool = False) -> Iterator[None]:
        """Run the ``with`` body under ``mixtures``; the previous mixtures are restored on exit, even on error.

        Args:
            mixtures: as :meth:`set_mixtures`.
            merge: also merge the (shared) mixture into the base weights for the body; restored exactly after.
        """
        self._check_live()
        if self.merged:
            raise InvalidInputError("cannot change mixtures while merged; call `unmerge()` first")
        previous = self._state
        state = self._resolve(mixtures)
        self._install(state)
        try:
            if merge:
                self.merge()
            yield
        finally:
            self.unmerge()
            self._install(previous)

    # -- merging ---------------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the current mixture (one for every row) into the base weights: forwards then cost nothing extra.

        Raises:
            InvalidInputError: per-row mixtures are set, a factor requires grad, or already merged.
        """
        self._check_live()
        state = self._state
        if state is None:
            return
        if self.merged:
            raise InvalidInputError("already merged; call `unmerge()` first")
        if state.lazy:
            raise InvalidInputError("cannot merge adapters whose factors require grad (training)")
        factors = state.shared_factors()
        for module, (a, b) in factors.items():
            self.layers[module].merge(a, b)

    def unmerge(self) -> None:
        """Restore every merged base weight bit for bit."""
        for layer in self.layers.values():
            layer.unmerge()

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def detach(self) -> nn.Module:
        """Unmerge, put the original modules back, restore ``requires_grad`` flags; returns the model."""
        if not self._attached:
            return self.model
        self.unmerge()
        self._install(None)
        for name, original in self._originals.items():
            _set_submodule(self.model, name, original)
        params = dict(self.model.named_parameters())
        for name, flag in self._frozen.items():
            if name in params:
                params[name].requires_grad_(flag)
        self._attached = False
        self.cache.clear()
        return self.model

    def cache_info(self) -> dict[str, int]:
        return self.cache.info()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    *,
    kernel: str = "auto",
    cache_bytes: int = 256 * 1024 * 1024,
    max_segments: int = 4,
    freeze_base: bool = True,
) -> MixtureHandle:
    """Wrap the targeted linear layers of ``model`` in :class:`MixtureLinear` (in place).

    Args:
        model: any ``torch.nn.Module`` with ``nn.Linear`` / ``Conv1D`` layers (HF or plain torch).
        target_modules: PEFT-style patterns (a regex string, or names/suffixes/globs; see
            :meth:`BaseProfile.match`); ``None`` = every linear layer except the output head.
        kernel: ``"auto"`` (shared / SGMV / BGMV by batch), or force ``"sgmv"`` / ``"bgmv"`` for per-row batches.
        cache_bytes: bound of the concatenated-factor cache.
        max_segments: with ``"auto"``, SGMV up to this many distinct mixtures in a batch, BGMV beyond.
        freeze_base: set ``requires_grad=False`` on the model's parameters (restored by ``detach``).

    Returns:
        The :class:`MixtureHandle`.

    Raises:
        ConfigError: no module matches, or the model is already attached.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if kernel not in KERNELS:
        raise ConfigError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    if any(isinstance(m, MixtureLinear) for m in model.modules()):
        raise ConfigError("`model` already has mixture layers attached; detach the first handle")
    profile = profile_from_model(model, target_modules=target_modules)
    frozen: dict[str, bool] = {}
    if freeze_base:
        for name, p in model.named_parameters():
            frozen[name] = p.requires_grad
            p.requires_grad_(False)
    layers: dict[str, MixtureLinear] = {}
    originals: dict[str, nn.Module] = {}
    slot = StateSlot()
    for name in profile.module_names:
        original = model.get_submodule(name)
        layer = MixtureLinear(original, name, slot)
        _set_submodule(model, name, layer)
        layers[name] = layer
        originals[name] = original
    return MixtureHandle(model, profile, layers, originals, frozen, kernel, FactorCache(cache_bytes), max_segments)
