"""AdapterSpec validation: every bad input is a SmoaError naming the field (issue 10, finding 10 + rough edges)."""

from __future__ import annotations

import math

import pytest
import torch

from smoa import AdapterSpecialization, InvalidInputError, SmoaError
from smoa.adapter.profile import default_profile
from smoa.adapter.spec import MAX_METADATA_VALUE_CHARS, AdapterSpec, ValidatedSpec, plan_modules, validate_spec
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity
from smoa.errors import InvalidAdapterError, NonFiniteWeightsError

from .helpers import open_lib, with_model

PROFILE = default_profile()
V0 = "model.layers.0.self_attn.v_proj"


def factors(scale_a: float = 0.1, scale_b: float = 0.1, rank: int = 2, module: str = V0) -> dict:
    d_in, d_out = PROFILE.shape(module)
    g = torch.Generator().manual_seed(0)
    return {module: (torch.randn(rank, d_in, generator=g) * scale_a, torch.randn(d_out, rank, generator=g) * scale_b)}


# -- finding 10: granularity from the real parameter count ------------------------------------------------------------
def test_all_modules_rank_2_is_not_reported_nano() -> None:
    modules, granularity, count = plan_modules(PROFILE, AdapterSpec(target_modules=".*", rank=2))
    assert count == 610_560 == sum(2 * sum(PROFILE.shape(m)) for m in modules)
    assert granularity is AdapterGranularity.SMALL


def test_library_stores_the_derived_granularity() -> None:
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync(AdapterSpecialization.CUSTOM, ["x"], target_modules=".*", rank=2)
        assert ad.num_parameters == 610_560
        assert ad.granularity is AdapterGranularity.SMALL
        assert smoa.get_adapter_sync(ad.id).granularity is AdapterGranularity.SMALL


# -- metadata --------------------------------------------------------------------------------------------------------
def test_metadata_none_and_none_values_are_accepted() -> None:
    assert validate_spec(AdapterSpec(metadata=None)).metadata == {}
    assert validate_spec(AdapterSpec(metadata={"owner": None, "n": [1, None]})).metadata == {"owner": None, "n": [1, None]}
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync("domain", ["a"], metadata={"owner": None, "unknown_key": 3})
        assert smoa.get_adapter_sync(ad.id).metadata == {"owner": None, "unknown_key": 3}


def test_metadata_values_are_length_capped() -> None:
    validate_spec(AdapterSpec(metadata={"k": "x" * MAX_METADATA_VALUE_CHARS}))
    with pytest.raises(InvalidInputError, match=r"`metadata` value at 'k'"):
        validate_spec(AdapterSpec(metadata={"k": "x" * (MAX_METADATA_VALUE_CHARS + 1)}))
    with pytest.raises(InvalidInputError, match="metadata"):
        validate_spec(AdapterSpec(metadata={"deep": {"er": ["y" * (MAX_METADATA_VALUE_CHARS + 1)]}}))


# -- wrong types never leak TypeError / AttributeError / re.error ----------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [{"target_modules": "("}, {"target_modules": "[a-"}, {"target_modules": 5}, {"target_modules": [3]},
     {"examples": 7}, {"examples": [None]}, {"members": 5, "specialization": "composite"}, {"metadata": [1, 2]},
     {"metadata": {1: "a"}}, {"weights": 5}, {"weights": "abc"}, {"weights": {V0: "nope"}}, {"rank": "2"},
     {"alpha": "1"}, {"description": None}, {"domain_tags": "medical"}, {"skill_tags": [None]}, {"pinned": "yes"},
     {"specialization": 3}, {"granularity": None}],
)  # fmt: skip
def test_bad_fields_raise_smoa_errors(fields: dict) -> None:
    with pytest.raises(SmoaError) as info:
        validate_spec(fields)
    assert not isinstance(info.value, (TypeError, AttributeError))


def test_bad_regex_is_invalid_input_naming_target_modules() -> None:
    with pytest.raises(InvalidInputError, match="`target_modules`"):
        validate_spec(AdapterSpec(target_modules="("))
    with open_lib() as smoa, pytest.raises(InvalidInputError, match="`target_modules`"):
        smoa.create_adapter_sync("domain", ["a"], target_modules="(")


def test_update_weights_with_wrong_types_raises_smoa_errors() -> None:
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync("domain", ["a"], weights=factors())
        for bad in ({}, {"nope": (1, 2)}, {V0: (torch.zeros(2, 3), torch.zeros(3, 2))}, [1, 2], "w", None, 3):
            with pytest.raises(SmoaError) as info:
                smoa.update_adapter_weights_sync(ad.id, bad)  # type: ignore[arg-type]
            assert not isinstance(info.value, (TypeError, AttributeError)), bad
        new = factors(0.2, 0.2)
        assert smoa.update_adapter_weights_sync(ad.id, new).version == 2  # a plain dict is accepted


def test_validated_once() -> None:
    v = validate_spec({"domain_tags": ["A"], "weights": factors()})
    assert isinstance(v, ValidatedSpec) and isinstance(v.weights, LoraWeights)
    assert validate_spec(v) is v


# -- alpha and overflowing factors: refused, never NaN logits ---------------------------------------------------------
@pytest.mark.parametrize("alpha", [1e300, math.inf, math.nan, -1.0, 0.0, 1e7])
def test_absurd_alpha_is_refused(alpha: float) -> None:
    with pytest.raises(InvalidInputError, match="`alpha`"):
        validate_spec(AdapterSpec(alpha=alpha))
    with pytest.raises(InvalidInputError, match="`alpha`"):
        validate_spec(AdapterSpec(alpha=alpha, weights=factors()))


def test_finite_factors_whose_product_overflows_are_refused() -> None:
    big = factors(1e20, 1e20)  # each factor finite in float32; B @ A overflows it
    with pytest.raises(NonFiniteWeightsError, match=V0):
        validate_spec(AdapterSpec(weights=big))
    with open_lib() as smoa:
        with pytest.raises(InvalidAdapterError):
            smoa.create_adapter_sync("domain", ["a"], weights=big)
        ad = smoa.create_adapter_sync("domain", ["a"], weights=factors())
        with pytest.raises(InvalidAdapterError):
            smoa.update_adapter_weights_sync(ad.id, LoraWeights(factors(1e20, 1e20), 4.0, 2))
        assert smoa.get_adapter_sync(ad.id).version == 1


def test_forward_never_returns_nan_logits_from_refused_weights() -> None:
    with with_model() as smoa:
        module = smoa.core.profile.module_names[0]
        d_in, d_out = smoa.core.profile.shape(module)
        ok = smoa.create_adapter_sync("domain", ["rain"], weights={module: (torch.full((2, d_in), 0.01), torch.full((d_out, 2), 0.01))})
        for alpha, scale in ((1e300, 0.01), (4.0, 1e20), (1e6, 1e3)):
            with pytest.raises(SmoaError):
                smoa.create_adapter_sync("domain", ["sun"], alpha=alpha,
                                         weights={module: (torch.full((2, d_in), scale), torch.full((d_out, 2), scale))})  # fmt: skip
        out = smoa.forward_sync(["rain and sun"], routes=[smoa.query_adapters_sync("rain", {"domain": "rain"}, k=1)])
        logits = out.logits if hasattr(out, "logits") else out
        assert torch.isfinite(logits).all()
        assert smoa.get_statistics()["library"]["total_adapters"] == 1 and ok.id
