"""Model-level equivalences on a tiny Llama and a tiny GPT-2 (Conv1D).

* a mixed batch equals each row run alone (every kernel), and ``[]`` rows equal the bare base model;
* one adapter at weight 1 equals the same adapter in a real PEFT ``PeftModel``;
* a k-mixture equals PEFT's exact ``add_weighted_adapter(..., combination_type="cat")``;
* per-row single adapters equal PEFT's mixed-batch inference (``adapter_names=``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from smoa.adapter.weights import LoraWeights
from smoa.inject import attach

from .inject_helpers import ids, peft_model

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv"])
def test_mixed_batch_equals_each_row_alone(tiny: nn.Module, adapters: list[LoraWeights], kernel: str) -> None:
    a = adapters
    rows = [
        [(a[0], 1.0)],
        [],  # explicit "no adapter" row
        [(a[1], 0.5), (a[2], 0.3), (a[3], 0.2)],
        [(a[0], 1.0)],  # same mixture as row 0: one slot, two rows
        [(a[4], -0.7), (a[1], 1.3)],
        [(a[2], 0.25), (a[3], 0.25), (a[4], 0.25), (a[0], 0.25), (a[1], 0.25)],
    ]
    x = ids(len(rows))
    base = _logits(tiny, x)
    handle = attach(tiny, kernel=kernel, max_segments=3)
    handle.set_mixtures(rows)
    mixed = _logits(tiny, x)
    for r, mix in enumerate(rows):
        handle.set_mixtures(mix)  # shared mixture on a batch of one
        alone = _logits(tiny, x[r : r + 1])
        torch.testing.assert_close(mixed[r : r + 1], alone, **TOL)
        if mix:
            assert not torch.allclose(alone, base[r : r + 1], atol=1e-3)  # the adapters really act
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-6)


def test_single_adapter_equals_peft(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    ref = peft_model(tiny, {"a3": adapters[3]})
    x = ids(3)
    want = _logits(ref, x)
    handle = attach(tiny)
    with handle.use([(adapters[3], 1.0)]):
        got = _logits(tiny, x)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, _logits(tiny, x), atol=1e-3)


def test_k_mixture_equals_peft_cat(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    chosen = {"a0": (adapters[0], 0.6), "a2": (adapters[2], 0.3), "a4": (adapters[4], -0.4)}
    ref = peft_model(tiny, {n: w for n, (w, _) in chosen.items()})
    ref.add_weighted_adapter(list(chosen), [w for _, w in chosen.values()], "mix", combination_type="cat")
    ref.set_adapter("mix")
    x = ids(2)
    want = _logits(ref, x)
    handle = attach(tiny)
    with handle.use(list(chosen.values())):
        got = _logits(tiny, x)
    torch.testing.assert_close(got, want, **TOL)


def test_per_row_adapters_equal_peft_mixed_batch(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    names = ["a0", "a1", "__base__", "a1", "a3"]
    ref = peft_model(tiny, {"a0": adapters[0], "a1": adapters[1], "a3": adapters[3]})
    x = ids(len(names))
    with torch.no_grad():
        want = ref(input_ids=x, adapter_names=names).logits
    by_name = {"a0": adapters[0], "a1": adapters[1], "a3": adapters[3]}
    handle = attach(tiny, kernel="bgmv")
    handle.set_mixtures([[(by_name[n], 1.0)] if n in by_name else [] for n in names])
    torch.testing.assert_close(_logits(tiny, x), want, **TOL)


def test_shared_mixture_fits_any_batch_and_generate_expands_rows(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    rows = [[(adapters[0], 1.0)], [(adapters[1], 0.5), (adapters[2], 0.5)]]
    x = ids(2, length=6)
    handle = attach(tiny, kernel="bgmv")
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with handle.use(rows), torch.no_grad():
        beams = tiny.generate(input_ids=x, attention_mask=torch.ones_like(x), num_beams=2,
                              num_return_sequences=2, **kw)  # fmt: skip
    for r, mix in enumerate(rows):
        with handle.use(mix), torch.no_grad():
            alone = tiny.generate(input_ids=x[r : r + 1], attention_mask=torch.ones_like(x[r : r + 1]), num_beams=2,
                                  num_return_sequences=2, **kw)  # fmt: skip
        assert torch.equal(beams[2 * r : 2 * r + 2], alone)


def test_deep_copy_of_model_is_unaffected(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    twin = copy.deepcopy(tiny)
    handle = attach(tiny)
    handle.set_mixtures([(adapters[1], 1.0)])
    x = ids(2)
    handle.clear()
    torch.testing.assert_close(_logits(tiny, x), _logits(twin, x), rtol=0, atol=0)
