"""`smoa.__all__` is the public API: pinned here, so adding or dropping a name is a deliberate change."""

from __future__ import annotations

import smoa

EXPECTED = [
    "Adapter", "AdapterGranularity", "AdapterNotFoundError", "AdapterSpec", "AdapterSpecialization", "BaseProfile",
    "CacheFullError", "CapacityError", "CompositionError", "ConfigError", "CorruptAdapterError", "InferenceEngine",
    "InvalidAdapterError", "InvalidInputError", "LibraryCore", "LibraryLockedError", "LoraWeights",
    "NonFiniteWeightsError", "OptimizationReport", "ProfileMismatchError", "Route", "RoutingStrategy", "SMoAConfig",
    "SmoaError", "SparseAdapterMixture", "StorageError", "TrainResult", "UnsafeAdapterFileError", "__version__",
    "attach", "create_sparse_adapter_mixture", "default_profile", "profile_from_model",
]  # fmt: skip


def test_all_is_pinned() -> None:
    assert sorted(smoa.__all__) == sorted(EXPECTED)


def test_every_exported_name_exists_and_is_public_api() -> None:
    for name in smoa.__all__:
        assert hasattr(smoa, name), name
    assert "AdapterLibrary" not in smoa.__all__  # its writes bypass the core: internal


def test_exported_classes_say_they_come_from_smoa() -> None:
    for name in smoa.__all__:
        member = getattr(smoa, name)
        if isinstance(member, type):
            assert member.__module__.startswith("smoa."), name
