"""smoa — Sparse Mixtures of Adapters.

A persistent library of LoRA adapters (thousands to millions of 1K–10K-parameter "nano" adapters and larger
ones) on one frozen base model: each query is routed to the few adapters that fit it, which are mixed exactly and
applied to the model, with lazy loading and a bounded cache so memory stays flat as the library grows.

    >>> from smoa import create_sparse_adapter_mixture, AdapterSpecialization, AdapterGranularity
    >>> smoa = create_sparse_adapter_mixture(max_active_adapters=3, routing_strategy="hybrid")
"""

from __future__ import annotations

from smoa.adapter.profile import BaseProfile, default_profile, profile_from_model
from smoa.adapter.spec import Adapter, AdapterSpec
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity, AdapterSpecialization, RoutingStrategy, SMoAConfig
from smoa.core import LibraryCore
from smoa.errors import (
    AdapterNotFoundError,
    CacheFullError,
    CapacityError,
    CompositionError,
    ConfigError,
    CorruptAdapterError,
    InvalidAdapterError,
    InvalidInputError,
    LibraryLockedError,
    NonFiniteWeightsError,
    ProfileMismatchError,
    SmoaError,
    StorageError,
    UnsafeAdapterFileError,
)
from smoa.inject.attach import attach
from smoa.inject.engine import InferenceEngine
from smoa.mixture import SparseAdapterMixture, create_sparse_adapter_mixture
from smoa.optimize.optimizer import OptimizationReport
from smoa.routing.route import Route
from smoa.train.api import TrainResult

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterGranularity",
    "AdapterNotFoundError",
    "AdapterSpec",
    "AdapterSpecialization",
    "BaseProfile",
    "CacheFullError",
    "CapacityError",
    "CompositionError",
    "ConfigError",
    "CorruptAdapterError",
    "InferenceEngine",
    "InvalidAdapterError",
    "InvalidInputError",
    "LibraryCore",
    "LibraryLockedError",
    "LoraWeights",
    "NonFiniteWeightsError",
    "OptimizationReport",
    "ProfileMismatchError",
    "Route",
    "RoutingStrategy",
    "SMoAConfig",
    "SmoaError",
    "SparseAdapterMixture",
    "StorageError",
    "TrainResult",
    "UnsafeAdapterFileError",
    "__version__",
    "attach",
    "create_sparse_adapter_mixture",
    "default_profile",
    "profile_from_model",
]
