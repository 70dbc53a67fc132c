"""Merge methods against independent references: dense sums, torch.linalg.svd and PEFT itself."""

from __future__ import annotations

import math

import pytest
import torch

from smoa.adapter.weights import LoraWeights
from smoa.compose.merge import METHODS, combine, factored_norm, merge_error
from smoa.errors import CompositionError

D_IN, D_OUT = 24, 16


def _adapter(gen: torch.Generator, rank: int, modules: list[str], alpha: float | None = None,
             dtype: torch.dtype = torch.float64) -> LoraWeights:  # fmt: skip
    factors = {m: (torch.randn(rank, D_IN, generator=gen, dtype=dtype), torch.randn(D_OUT, rank, generator=gen, dtype=dtype))
               for m in modules}  # fmt: skip
    return LoraWeights(factors, float(alpha if alpha is not None else 2 * rank), rank)


def _dense_target(adapters: list[LoraWeights], weights: list[float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for lw, w in zip(adapters, weights):
        for m in lw.factors:
            out[m] = out.get(m, torch.zeros(D_OUT, D_IN, dtype=torch.float64)) + w * lw.delta(m).double()
    return out


def _dense_error(merged: LoraWeights, target: dict[str, torch.Tensor]) -> float:
    err = sum(float((merged.delta(m).double() - t).pow(2).sum()) for m, t in target.items())
    err += sum(float(merged.delta(m).double().pow(2).sum()) for m in merged.factors if m not in target)
    return math.sqrt(err / sum(float(t.pow(2).sum()) for t in target.values()))


@pytest.fixture
def members() -> tuple[list[LoraWeights], list[float]]:
    g = torch.Generator().manual_seed(0)
    ads = [_adapter(g, 2, ["m0", "m1"]), _adapter(g, 3, ["m1", "m2"], alpha=3.0), _adapter(g, 2, ["m0"], alpha=8.0)]
    return ads, [0.7, -1.3, 0.4]


def test_cat_is_exact_with_summed_rank(members: tuple[list[LoraWeights], list[float]]) -> None:
    ads, ws = members
    merged = combine(ads, ws, "cat")
    assert merged.rank == 7 and merged.alpha == 7.0 and merged.scaling == 1.0
    assert merged.modules == ["m0", "m1", "m2"]
    target = _dense_target(ads, ws)
    for m, t in target.items():
        torch.testing.assert_close(merged.delta(m).double(), t, rtol=1e-10, atol=1e-10)
    assert merge_error(ads, ws, merged) < 1e-12


def test_svd_full_rank_is_exact_and_truncation_is_optimal(members: tuple[list[LoraWeights], list[float]]) -> None:
    ads, ws = members
    target = _dense_target(ads, ws)
    assert merge_error(ads, ws, combine(ads, ws, "svd", rank=5)) < 1e-10  # every module's sum has rank <= 5
    for r in (1, 2, 3):
        merged = combine(ads, ws, "svd", rank=r)
        tail2 = total2 = 0.0
        for m, t in target.items():
            u, s, vh = torch.linalg.svd(t)
            best = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young reference, dense
            torch.testing.assert_close(merged.delta(m).double(), best, rtol=1e-8, atol=1e-8)
            tail2 += float(s[r:].pow(2).sum())
            total2 += float(s.pow(2).sum())
        assert merge_error(ads, ws, merged) == pytest.approx(math.sqrt(tail2 / total2), rel=1e-8)
        assert _dense_error(merged, target) == pytest.approx(merge_error(ads, ws, merged), rel=1e-8)


def test_svd_default_rank_is_largest_member_rank(members: tuple[list[LoraWeights], list[float]]) -> None:
    ads, ws = members
    assert combine(ads, ws, "svd").rank == 3


@pytest.mark.parametrize("method", list(METHODS))
def test_single_member_at_weight_one_comes_back_unchanged(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    one = _adapter(g, 3, ["m0", "m1"], alpha=5.0)
    kwargs = {"density": 1.0} if METHODS[method].needs_density else {}
    merged = combine([one], [1.0], method, **kwargs)
    for m in one.factors:
        torch.testing.assert_close(merged.delta(m), one.delta(m), rtol=1e-10, atol=1e-10)
    assert merge_error([one], [1.0], merged) < 1e-10


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_error_matches_dense_computation(method: str, members: tuple[list[LoraWeights], list[float]]) -> None:
    ads, ws = members
    merged = combine(ads, ws, method)
    assert merge_error(ads, ws, merged) == pytest.approx(_dense_error(merged, _dense_target(ads, ws)), rel=1e-7)


def test_linear_pads_lower_ranks_and_matches_the_factor_average() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = _adapter(g, 2, ["m0"], alpha=4.0), _adapter(g, 3, ["m0"], alpha=3.0)
    ws = [0.5, -2.0]
    merged = combine([a, b], ws, "linear")
    (a1, b1), (a2, b2) = a.factors["m0"], b.factors["m0"]
    ca, cb = ws[0] * a.scaling, ws[1] * b.scaling
    pad_a = torch.cat([a1, torch.zeros(1, D_IN, dtype=a1.dtype)])
    pad_b = torch.cat([b1, torch.zeros(D_OUT, 1, dtype=b1.dtype)], dim=1)
    big_a = math.copysign(math.sqrt(abs(ca)), ca) * pad_a + math.copysign(math.sqrt(abs(cb)), cb) * a2
    big_b = math.sqrt(abs(ca)) * pad_b + math.sqrt(abs(cb)) * b2
    torch.testing.assert_close(merged.delta("m0"), big_b @ big_a)


def test_output_keeps_the_first_members_dtype() -> None:
    g = torch.Generator().manual_seed(3)
    ads = [_adapter(g, 2, ["m0"], dtype=torch.float16), _adapter(g, 2, ["m0"], dtype=torch.float16)]
    for method in METHODS:
        merged = combine(ads, None, method)
        assert all(t.dtype == torch.float16 for pair in merged.factors.values() for t in pair)


def test_dare_is_reproducible_by_seed() -> None:
    g = torch.Generator().manual_seed(4)
    ads = [_adapter(g, 2, ["m0"]), _adapter(g, 2, ["m0"])]
    x = combine(ads, [1, 1], "dare_linear", density=0.5, seed=7)
    y = combine(ads, [1, 1], "dare_linear", density=0.5, seed=7)
    z = combine(ads, [1, 1], "dare_linear", density=0.5, seed=8)
    torch.testing.assert_close(x.factors["m0"][0], y.factors["m0"][0])
    assert not torch.equal(x.factors["m0"][0], z.factors["m0"][0])


def test_factored_norm_matches_dense_even_under_cancellation() -> None:
    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(D_OUT, 2, generator=g, dtype=torch.float64), torch.randn(2, D_IN, generator=g, dtype=torch.float64)
    eps = torch.randn(D_OUT, 2, generator=g, dtype=torch.float64) * 1e-7
    dense = float(torch.linalg.matrix_norm((b + eps) @ a - b @ a))
    assert factored_norm([b + eps, -b], [a, a]) == pytest.approx(dense, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"adapters": []}, "`adapters`"),
        ({"weights": [1.0]}, "`weights`"),
        ({"weights": [1.0, float("nan")]}, "`weights`[1]"),
        ({"method": "average"}, "`method`"),
        ({"method": "cat", "rank": 2}, "`rank`"),
        ({"method": "svd", "rank": 0}, "`rank`"),
        ({"method": "ties", "density": 0.0}, "`density`"),
        ({"method": "svd", "density": 0.5}, "`density`"),
        ({"method": "ties", "majority_sign_method": "max"}, "`majority_sign_method`"),
    ],
)
def test_bad_arguments_raise_composition_error(kwargs: dict, fragment: str) -> None:
    g = torch.Generator().manual_seed(6)
    args = {"adapters": [_adapter(g, 2, ["m0"]), _adapter(g, 2, ["m0"])], "weights": [1.0, 1.0], **kwargs}
    with pytest.raises(CompositionError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        combine(**args)


def test_members_disagreeing_on_a_module_shape_are_refused() -> None:
    a = LoraWeights({"m0": (torch.randn(2, D_IN), torch.randn(D_OUT, 2))}, 4.0, 2)
    b = LoraWeights({"m0": (torch.randn(2, D_IN + 1), torch.randn(D_OUT, 2))}, 4.0, 2)
    with pytest.raises(CompositionError, match="m0"):
        combine([a, b], None, "cat")


# -- PEFT as the reference -------------------------------------------------------------------------------------
def _peft_model_with_two_adapters():  # -> (peft model, [LoraWeights x 2], module names)
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    model = peft.get_peft_model(
        LlamaForCausalLM(cfg), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "q_proj"]), "one"
    )
    model.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj", "down_proj"]))
    ours: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {"one": {}, "two": {}}
    names = []
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and len(mod.lora_A):
            names.append(name)
            for ad in mod.lora_A:
                with torch.no_grad():
                    mod.lora_A[ad].weight.normal_()
                    mod.lora_B[ad].weight.normal_()
                ours[ad][name] = (mod.lora_A[ad].weight.detach().clone(), mod.lora_B[ad].weight.detach().clone())
    weights = [LoraWeights(ours["one"], 4.0, 2), LoraWeights(ours["two"], 8.0, 2)]
    return model, weights, names


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "magnitude_prune"])
def test_matches_peft_add_weighted_adapter(method: str) -> None:
    model, ads, names = _peft_model_with_two_adapters()
    ws = [0.8, -0.6]
    density = 0.5 if METHODS[method].needs_density else None
    model.add_weighted_adapter(["one", "two"], ws, "merged", combination_type=method, density=density)
    merged = combine(ads, ws, method, density=density)
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        if name not in merged.factors:
            continue
        ref = layer.get_delta_weight("merged")
        scale = float(ref.abs().max())  # PEFT works in float32 (dense SVD for 'svd'); we work in float64
        torch.testing.assert_close(merged.delta(name), ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_merge_utils_with_the_same_seed(method: str) -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    from smoa.compose.merge import _TASK_FUNCS

    g = torch.Generator().manual_seed(9)
    tensors = [torch.randn(4, 30, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -1.0, 2.0])
    torch.manual_seed(123)
    ref = getattr(merge_utils, method)(tensors, w, 0.4)
    ours = _TASK_FUNCS[method](tensors, w, 0.4, torch.Generator().manual_seed(123), "total")
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_combine_mean_returns_identical_members_unchanged(method: str) -> None:
    from smoa.compose.merge import combine_mean

    g = torch.Generator().manual_seed(10)
    one = _adapter(g, 2, ["m0", "m1"])
    kwargs = {"density": 1.0} if METHODS[method].needs_density else {}
    merged = combine_mean([one, one.clone(), one.clone()], method, **kwargs)
    assert merge_error([one] * 3, [1 / 3] * 3, merged) < 1e-7
