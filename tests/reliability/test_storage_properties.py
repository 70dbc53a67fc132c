"""Property tests (hypothesis) of the storage round trip: create, close, reopen -> the same bits.

Weights: random module subsets, ranks 1-8, dtypes float32/float16/bfloat16/float64, values from a seeded normal
with special values planted at drawn positions (subnormals, -0.0, the largest finite value, the smallest normal),
alpha over 60 orders of magnitude (brought down when ``alpha / r * B @ A`` would exceed the library's delta cap,
:data:`smoa.adapter.weights.MAX_DELTA_ABS`: such weights are refused since issue 10, and
tests/core_edges/test_spec.py checks the refusal); stored inline or as files; created alone or in bulk; updated once.
Text: tags, descriptions and JSON metadata from the whole Unicode range minus what the library refuses; tags come
back in their normal form (:func:`smoa.adapter.tags.normalize_tags`).
Every tensor must come back with the same dtype, shape and *bits* (so -0.0 and NaN-free subnormals count).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from smoa import AdapterSpec
from smoa.adapter.tags import MAX_TAG_CHARS, normalize_tag, normalize_tags
from smoa.adapter.weights import MAX_DELTA_ABS, LoraWeights

from .helpers import TINY, open_lib

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _specials(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    return [-0.0, 0.0, fi.max, -fi.max, fi.tiny, -fi.tiny, fi.tiny / 4, fi.smallest_normal / 1024, fi.eps, 1.0, -1.0]


@st.composite
def lora_weights(draw: Any) -> LoraWeights:
    modules = draw(st.lists(st.sampled_from(TINY.module_names), min_size=1, max_size=4, unique=True))
    rank = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    specials = _specials(dtype)
    factors = {}
    for m in modules:
        d_in, d_out = TINY.shape(m)
        pair = []
        for shape in ((rank, d_in), (d_out, rank)):
            t = (torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-6, 1.0, 1e3])))
            t = t.to(dtype)
            flat = t.view(-1)
            for pos, val in draw(st.lists(st.tuples(st.integers(0, flat.numel() - 1), st.sampled_from(specials)),
                                          max_size=6)):  # fmt: skip
                flat[pos] = torch.tensor(val, dtype=torch.float64).to(dtype)
            assert bool(torch.isfinite(t).all())
            pair.append(t)
        factors[m] = (pair[0], pair[1])
    alpha = draw(st.floats(1e-30, 1e30, allow_nan=False, allow_infinity=False))
    peak = delta_peak(factors, alpha, rank)
    if not peak <= MAX_DELTA_ABS / 2:  # refused by the library: bring alpha down, or drop the example
        per_alpha = delta_peak(factors, 1.0, rank)
        assume(np.isfinite(per_alpha) and per_alpha > 0 and MAX_DELTA_ABS / 2 / per_alpha >= 1e-300)
        alpha = MAX_DELTA_ABS / 2 / per_alpha
    return LoraWeights(factors, alpha, rank)


def delta_peak(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, rank: int) -> float:
    """Independent reference (numpy, float64): the largest ``|alpha / rank * (B @ A)[i, j]|`` (inf on overflow)."""
    peak = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b in factors.values():
            m = float(np.abs(b.double().numpy() @ a.double().numpy()).max()) * alpha / rank
            peak = max(peak, m if np.isfinite(m) else float("inf"))
    return peak


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda s: 0 < len(normalize_tag(s)) <= MAX_TAG_CHARS  # visible, and within the cap after NFKC
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@st.composite
def specs(draw: Any) -> AdapterSpec:
    return AdapterSpec(
        weights=draw(lora_weights()),
        domain_tags=draw(st.lists(TEXT, max_size=4)),
        skill_tags=draw(st.lists(TEXT, max_size=4)),
        description=draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)),
        metadata=draw(st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=10), JSON, max_size=4)),
    )


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_bits(got: LoraWeights, want: LoraWeights) -> None:
    order = [m for m in TINY.module_names if m in want.factors]  # the library stores in profile order
    assert list(got.factors) == order
    assert got.rank == want.rank and repr(got.alpha) == repr(float(want.alpha))
    for m in order:
        for g, w in zip(got[m], want[m]):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert _bits(g) == _bits(w), f"{m}: bits differ"


def _round_trip(batch: list[AdapterSpec], update: LoraWeights, inline_max: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lib"
        lib = open_lib(path, blob_inline_max_bytes=inline_max)
        made = lib.create_many(batch) if len(batch) > 1 else [lib.create(batch[0])]
        updated = lib.update_weights(made[0].id, update)
        assert updated.version == 2
        lib.close()
        lib = open_lib(path, blob_inline_max_bytes=inline_max)
        try:
            for i, (ad, spec) in enumerate(zip(made, batch)):
                back = lib.get_adapter(ad.id)
                assert back.domain_tags == normalize_tags(list(spec.domain_tags))
                assert back.skill_tags == normalize_tags(list(spec.skill_tags))
                assert back.description == spec.description
                assert back.metadata == ad.metadata  # what create returned == what a reopen returns
                assert_same_bits(lib.get_weights(ad.id), update if i == 0 else spec.weights)  # type: ignore[arg-type]
        finally:
            lib.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(specs(), min_size=1, max_size=3), update=lora_weights(), inline_max=st.sampled_from([0, 1 << 20]))
def test_storage_round_trip_is_bit_exact(batch: list[AdapterSpec], update: LoraWeights, inline_max: int) -> None:
    _round_trip(batch, update, inline_max)


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(specs(), min_size=1, max_size=5), update=lora_weights(), inline_max=st.sampled_from([0, 1500, 1 << 20]))
def test_storage_round_trip_is_bit_exact_long(batch: list[AdapterSpec], update: LoraWeights, inline_max: int) -> None:
    _round_trip(batch, update, inline_max)


def test_special_values_survive_exactly() -> None:
    """The planted values themselves, deterministically, in every dtype (the property test samples them)."""
    for dtype in DTYPES:
        vals = torch.tensor(_specials(dtype), dtype=torch.float64).to(dtype)
        a = torch.zeros(1, 64, dtype=dtype)
        a[0, : len(vals)] = vals
        w = LoraWeights({"layers.0.q": (a, torch.zeros(64, 1, dtype=dtype))}, 2.0, 1)
        _round_trip([AdapterSpec(weights=w)], w, 0)
        assert _bits(torch.tensor([-0.0], dtype=dtype)) != _bits(torch.tensor([0.0], dtype=dtype))  # bits, not ==
