"""The mixture layer: a frozen ``nn.Linear`` (or transformers ``Conv1D``) plus per-row LoRA mixtures.

::

    x ──► base layer (run once) ─────────────────► y_base ─┐
    │                                                      ▼
    └──► per row: sum_i w_i s_i B_i (A_i x)  ───────────► (+) ──► y

The layer holds no adapter weights of its own: the :class:`~smoa.inject.plan.MixtureState` shared by all
wrapped layers of a model says, per module, which kernel adds which factors to which rows. With no state, or
while merged, the layer is exactly its base layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from smoa.inject.plan import MixtureState


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (weight stored ``[d_in, d_out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers missing
        return False
    return isinstance(module, Conv1D)


class StateSlot:
    """One mutable cell shared by every layer of a handle: switching mixtures is one assignment, not one per layer."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: MixtureState | None = None


class MixtureLinear(nn.Module):
    """Wraps one linear layer; adds the current mixture state's per-row updates to its output.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` being wrapped (kept, not copied).
        module_name: its name in the model (the key of adapters' factors).
        slot: the handle's shared :class:`StateSlot` (a private one when omitted).
    """

    def __init__(self, base_layer: nn.Module, module_name: str, slot: StateSlot | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.slot = slot if slot is not None else StateSlot()
        self._backup: torch.Tensor | None = None

    @property
    def state(self) -> MixtureState | None:
        return self.slot.state

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight` of its linear layers
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return self._backup is not None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: [batch, ..., d_in]`` -> ``[batch, ..., d_out]``; row ``r`` gets its own mixture's update."""
        y = self.base_layer(x, *args, **kwargs)
        state = self.slot.state
        if state is None or self._backup is not None:
            return y
        plan = state.plan_for(self.module_name, x.shape[0])
        if plan is None:
            return y
        return plan.apply(x, y)

    # -- merging -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add ``b @ a`` (``[d_out, d_in]``) into the base weight; a copy of the weight is kept for :meth:`unmerge`."""
        if self._backup is not None:
            raise RuntimeError(f"{self.module_name} is already merged")  # internal invariant (handle checks)
        w = self.base_layer.weight
        delta = (b @ a).to(w.dtype)  # [d_out, d_in]
        self._backup = w.detach().clone()
        w.add_(delta.T if is_conv1d(self.base_layer) else delta)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit from the copy taken by :meth:`merge`."""
        if self._backup is None:
            return
        self.base_layer.weight.copy_(self._backup)
        self._backup = None

    def extra_repr(self) -> str:
        return f"module_name={self.module_name!r}, merged={self.merged}"
