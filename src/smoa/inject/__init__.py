"""Apply per-request LoRA mixtures to a frozen base model: exact, batched, in one forward.

* :func:`attach` wraps a model's linear layers and returns a :class:`MixtureHandle` (set per-row mixtures,
  ``use`` as a context manager, ``merge`` / ``unmerge``, ``detach``).
* :class:`InferenceEngine` drives an attached model from texts or token ids (``forward``, ``generate``, ``loss``).
* :mod:`smoa.inject.kernels` holds the pure tensor kernels (shared LoRA, SGMV, BGMV).
"""

from __future__ import annotations

from smoa.inject.attach import MixtureHandle, attach
from smoa.inject.engine import InferenceEngine, token_nll
from smoa.inject.layer import MixtureLinear
from smoa.inject.plan import FactorCache, Mixture, MixtureItem

__all__ = [
    "FactorCache",
    "InferenceEngine",
    "Mixture",
    "MixtureHandle",
    "MixtureItem",
    "MixtureLinear",
    "attach",
    "token_nll",
]
