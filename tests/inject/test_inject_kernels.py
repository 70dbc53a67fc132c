"""The three kernels against the slow per-row reference loop (`reference_delta`)."""

from __future__ import annotations

import pytest
import torch

from smoa.inject.kernels import (
    bgmv_indices,
    concat_factors,
    lora_bgmv,
    lora_sgmv,
    lora_shared,
    pad_stack,
    reference_delta,
)

D_IN, D_OUT, T = 24, 40, 5


def _mixture(seed: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        r = 1 + (seed + i) % 4
        out.append((torch.randn(r, D_IN, generator=g), torch.randn(D_OUT, r, generator=g), 0.3 + 0.5 * i))
    return out


def _x(batch: int) -> torch.Tensor:
    return torch.randn(batch, T, D_IN, generator=torch.Generator().manual_seed(7))


def test_concat_factors_is_the_weighted_sum_of_updates() -> None:
    mix = _mixture(1, 3)
    a_cat, b_cat = concat_factors(mix)
    dense = sum(coef * b @ a for a, b, coef in mix)
    assert a_cat.shape == (sum(a.shape[0] for a, _, _ in mix), D_IN)
    torch.testing.assert_close(b_cat @ a_cat, dense, rtol=1e-5, atol=1e-5)


def test_shared_matches_reference() -> None:
    x, mix = _x(3), _mixture(2, 3)
    y0 = torch.randn(3, T, D_OUT)
    a, b = concat_factors(mix)
    got = lora_shared(x, y0.clone(), a, b)
    torch.testing.assert_close(got, y0 + reference_delta(x, [mix] * 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv"])
def test_per_row_kernels_match_reference_with_no_adapter_rows(kernel: str) -> None:
    mixes = [_mixture(s, k) for s, k in [(1, 1), (2, 3), (3, 5)]]
    row_slots = [1, -1, 0, 2, 2, -1, 0]  # rows 1 and 5 use no adapter
    x = _x(len(row_slots))
    y0 = torch.randn(len(row_slots), T, D_OUT)
    factors = [concat_factors(m) for m in mixes]
    if kernel == "sgmv":
        groups = []
        for s, (a, b) in enumerate(factors):
            rows = [r for r, rs in enumerate(row_slots) if rs == s]
            groups.append((torch.tensor(rows), a, b))
        groups[0] = (torch.tensor([2, 6]), *factors[0])
        got = lora_sgmv(x, y0.clone(), groups)
    else:
        r_max = max(a.shape[0] for a, _ in factors)
        slot, rows = bgmv_indices(torch.tensor(row_slots))
        assert slot is not None and rows is not None
        got = lora_bgmv(x, y0.clone(), pad_stack([a for a, _ in factors], 0, r_max),
                        pad_stack([b for _, b in factors], 1, r_max), slot, rows)  # fmt: skip
    want = y0 + reference_delta(x, [mixes[s] if s >= 0 else [] for s in row_slots])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_adapter = [r for r, s in enumerate(row_slots) if s < 0]
    assert torch.equal(got[no_adapter], y0[no_adapter])  # untouched, bit for bit


def test_sgmv_contiguous_segments_use_slices() -> None:
    mixes = [_mixture(4, 2), _mixture(5, 1)]
    x, y0 = _x(5), torch.randn(5, T, D_OUT)
    groups = [(slice(0, 2), *concat_factors(mixes[0])), (slice(2, 5), *concat_factors(mixes[1]))]
    got = lora_sgmv(x, y0.clone(), groups)
    want = y0 + reference_delta(x, [mixes[0]] * 2 + [mixes[1]] * 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rank_padding_adds_exact_zeros() -> None:
    a = torch.randn(2, D_IN)
    padded = pad_stack([a, torch.randn(5, D_IN)], 0, 5)
    assert padded.shape == (2, 5, D_IN)
    assert torch.equal(padded[0, :2], a) and not padded[0, 2:].any()
    b = torch.randn(D_OUT, 2)
    pb = pad_stack([b], 1, 4)
    assert pb.shape == (1, D_OUT, 4) and torch.equal(pb[0, :, :2], b) and not pb[0, :, 2:].any()


def test_kernels_are_differentiable_out_of_place() -> None:
    mix = _mixture(6, 2)
    params = [(a.clone().requires_grad_(), b.clone().requires_grad_(), c) for a, b, c in mix]
    x, y0 = _x(4), torch.randn(4, T, D_OUT)
    y_copy = y0.clone()
    a, b = concat_factors(params)
    r_max = a.shape[0]
    slot, rows = bgmv_indices(torch.tensor([0, -1, 0, 0]))
    out_b = lora_bgmv(x, y0, pad_stack([a], 0, r_max), pad_stack([b], 1, r_max), slot, rows)
    out_b.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for a_, b_, _ in params for p in (a_, b_))
    assert torch.equal(y0, y_copy)  # the base output is not modified in place under grad
    grads = [p.grad.clone() for a_, b_, _ in params for p in (a_, b_)]
    for a_, b_, _ in params:
        a_.grad = b_.grad = None
    a, b = concat_factors(params)
    lora_sgmv(x, y0, [(torch.tensor([0, 2, 3]), a, b)]).sum().backward()
    for g, p in zip(grads, [p for a_, b_, _ in params for p in (a_, b_)]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_bgmv_in_row_order_needs_no_gather() -> None:
    mixes = [_mixture(s, 2) for s in (7, 8, 9)]
    factors = [concat_factors(m) for m in mixes]
    r_max = max(a.shape[0] for a, _ in factors)
    a_stack, b_stack = pad_stack([a for a, _ in factors], 0, r_max), pad_stack([b for _, b in factors], 1, r_max)
    assert bgmv_indices(torch.tensor([0, 1, 2])) == (None, None)
    slot, rows = bgmv_indices(torch.tensor([0, -1, 1]))
    assert slot is None and rows.tolist() == [0, 2]
    x, y0 = _x(3), torch.randn(3, T, D_OUT)
    got = lora_bgmv(x, y0.clone(), a_stack, b_stack)
    torch.testing.assert_close(got, y0 + reference_delta(x, mixes), rtol=1e-5, atol=1e-5)
