from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights, encode_safetensors, init_lora
from smoa.errors import CorruptAdapterError, NonFiniteWeightsError, ProfileMismatchError

PROFILE = BaseProfile("tiny", (("l0.q", 8, 8), ("l0.v", 8, 4), ("l1.q", 8, 8)))


def _random(rank: int = 2, dtype: torch.dtype = torch.float32) -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    return LoraWeights(
        {m: (torch.randn(rank, i, generator=g).to(dtype), torch.randn(o, rank, generator=g).to(dtype))
         for m, i, o in PROFILE.modules},
        alpha=4.0, rank=rank,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bytes_round_trip_through_reference_parser(dtype: torch.dtype) -> None:
    w = _random(dtype=dtype)
    data = w.to_bytes()
    ref = load(data)  # the safetensors library parses what we encode
    for m, (a, b) in w.items():
        assert torch.equal(ref[f"{m}.lora_A"], a) and torch.equal(ref[f"{m}.lora_B"], b)
    back = LoraWeights.from_bytes(data)
    assert back.alpha == 4.0 and back.rank == 2
    for m in w:
        assert torch.equal(back[m][0], w[m][0]) and torch.equal(back[m][1], w[m][1])
    assert data == w.to_bytes()  # deterministic


def test_encoder_matches_safetensors_header_rules() -> None:
    data = encode_safetensors([("x", torch.ones(3, dtype=torch.float16))], {"k": "v"})
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and len(data) == 8 + n + 6


def test_init_is_standard_lora() -> None:
    w = init_lora(PROFILE, ["l0.q", "l0.v"], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(1))
    a, b = w["l0.q"]
    assert a.shape == (4, 8) and b.shape == (8, 4)
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / math.sqrt(8)
    assert w.scaling == 2.0 and w.num_parameters == 4 * (8 + 8) + 4 * (8 + 4)
    assert torch.allclose(w.delta("l0.q"), torch.zeros(8, 8))


def test_validate_collects_problems() -> None:
    bad = LoraWeights({"l0.q": (torch.zeros(2, 7), torch.zeros(8, 2)), "nope": (torch.zeros(2, 8), torch.zeros(8, 2))}, 1.0, 2)
    with pytest.raises(ProfileMismatchError) as info:
        bad.validate(PROFILE)
    assert "'nope'" in str(info.value) and "(2, 7)" in str(info.value)
    nan = _random()
    nan.factors["l1.q"][1][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"l1\.q\.B"):
        nan.validate(PROFILE)


@pytest.mark.parametrize("cut", [0, 7, 8, 20, -1])
def test_truncated_bytes_are_corrupt(cut: int) -> None:
    data = _random().to_bytes()
    with pytest.raises(CorruptAdapterError):
        LoraWeights.from_bytes(data[:cut], name="x")
