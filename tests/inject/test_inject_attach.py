"""The handle: merge / unmerge, detach, `use`, training, caching, and refusing adapters that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from smoa.adapter.profile import profile_from_model
from smoa.adapter.weights import LoraWeights
from smoa.errors import ConfigError, InvalidInputError, NonFiniteWeightsError, ProfileMismatchError
from smoa.inject import MixtureLinear, attach

from .inject_helpers import ids, peft_model, random_lora

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merge_matches_unmerged_and_unmerge_restores_bits(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    handle = attach(tiny)
    before = _weights(tiny)
    x = ids(3)
    handle.set_mixtures([(adapters[1], 0.7), (adapters[3], 0.4)])
    unmerged = _logits(tiny, x)
    handle.merge()
    assert handle.merged
    changed = [k for k, v in _weights(tiny).items() if not torch.equal(v, before[k])]
    assert changed and all("base_layer.weight" in k for k in changed)
    torch.testing.assert_close(_logits(tiny, x), unmerged, **TOL)
    with pytest.raises(InvalidInputError, match="unmerge"):
        handle.set_mixtures([(adapters[0], 1.0)])
    handle.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in _weights(tiny).items())
    torch.testing.assert_close(_logits(tiny, x), unmerged, rtol=0, atol=0)


def test_merge_refuses_per_row_mixtures(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    handle = attach(tiny)
    handle.set_mixtures([[(adapters[0], 1.0)], [(adapters[1], 1.0)]])
    with pytest.raises(InvalidInputError, match="one mixture"):
        handle.merge()
    assert not handle.merged


def test_use_restores_previous_state_even_on_error(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    handle = attach(tiny)
    x = ids(2)
    handle.set_mixtures([(adapters[0], 1.0)])
    outer = _logits(tiny, x)
    before = _weights(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with handle.use([(adapters[2], 1.0)], merge=True):
            assert handle.merged
            raise RuntimeError("boom")
    assert not handle.merged
    assert all(torch.equal(v, before[k]) for k, v in _weights(tiny).items())
    torch.testing.assert_close(_logits(tiny, x), outer, rtol=0, atol=0)


def test_detach_restores_original_modules_and_flags(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    x = ids(2)
    base = _logits(tiny, x)
    originals = {n: m for n, m in tiny.named_modules()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    handle = attach(tiny)
    assert all(not p.requires_grad for p in tiny.parameters())
    assert sum(isinstance(m, MixtureLinear) for m in tiny.modules()) == len(handle.profile)
    with pytest.raises(ConfigError, match="already"):
        attach(tiny)
    handle.set_mixtures([(adapters[3], 1.0)])
    handle.merge()
    model = handle.detach()
    assert model is tiny and not any(isinstance(m, MixtureLinear) for m in tiny.modules())
    assert all(originals[n] is m for n, m in tiny.named_modules())
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == flags
    torch.testing.assert_close(_logits(tiny, x), base, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="detached"):
        handle.set_mixtures([(adapters[0], 1.0)])


def test_training_gradients_match_peft(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    lora = adapters[2].clone()
    ref = peft_model(tiny, {"t": lora})
    x = ids(2)
    ref.train()
    ref(input_ids=x, labels=x).loss.backward()
    handle = attach(tiny)
    tiny.train()
    for a, b in lora.factors.values():
        a.requires_grad_(True)
        b.requires_grad_(True)
    with handle.use([(lora, 1.0)]):
        tiny(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for p in tiny.parameters())  # the base is frozen
    for module, (a, b) in lora.factors.items():
        layer = ref.base_model.model.get_submodule(module)
        torch.testing.assert_close(a.grad, layer.lora_A["t"].weight.grad, **TOL)
        torch.testing.assert_close(b.grad, layer.lora_B["t"].weight.grad, **TOL)


def test_optimizer_steps_are_seen_without_restacking_by_hand(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    lora = adapters[0].clone()
    params = [t.requires_grad_(True) for pair in lora.factors.values() for t in pair]
    opt = torch.optim.SGD(params, lr=0.5)
    handle = attach(tiny)
    x = ids(2)
    handle.set_mixtures([[(lora, 1.0)], [(lora, 1.0)]])
    losses = []
    for _ in range(3):
        loss = tiny(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[2] < losses[0]
    # after training, no-grad inference (cached path) uses the updated factors
    for t in params:
        t.requires_grad_(False)
    handle.set_mixtures([(lora, 1.0)])
    cached = _logits(tiny, x)
    handle.detach()
    ref = peft_model(tiny, {"t": lora})
    torch.testing.assert_close(cached, _logits(ref, x), **TOL)


def test_in_place_edits_are_restacked(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    lora = adapters[1].clone()
    handle = attach(tiny)
    x = ids(1)
    handle.set_mixtures([(lora, 1.0)])
    first = _logits(tiny, x)
    with torch.no_grad():
        for _, b in lora.factors.values():
            b.mul_(2.0)
    handle.set_mixtures([(lora, 1.0)])
    doubled = _logits(tiny, x)
    handle.set_mixtures([(lora, 2.0)])
    assert not torch.allclose(first, doubled)
    assert handle.cache_info()["misses"] == 3


def test_keys_share_stacks_across_reloaded_copies(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    handle = attach(tiny)
    handle.set_mixtures([(("ad-1", 1), adapters[0], 1.0)])
    handle.set_mixtures([(("ad-1", 1), adapters[0].clone(), 1.0)])  # a reloaded copy, same key
    info = handle.cache_info()
    assert (info["hits"], info["misses"], info["entries"]) == (1, 1, 1)
    handle.set_mixtures([(adapters[0], 1.0)])  # no key: identity
    handle.set_mixtures([(adapters[0], 1.0)])
    info = handle.cache_info()
    assert (info["hits"], info["misses"], info["entries"]) == (2, 2, 2)


def test_wrong_module_names_or_shapes_raise(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    prof = profile_from_model(tiny)
    handle = attach(tiny, target_modules=[prof.module_names[0].rsplit(".", 1)[-1]])
    assert len(handle.profile) < len(prof)
    outside = random_lora(prof, [prof.module_names[1]], rank=2, alpha=4, seed=1)
    with pytest.raises(ProfileMismatchError, match="not in profile"):
        handle.set_mixtures([(outside, 1.0)])
    name = handle.profile.module_names[0]
    d_in, d_out = handle.profile.shape(name)
    bad_shape = LoraWeights({name: (torch.ones(2, d_in + 1), torch.ones(d_out, 2))}, 4.0, 2)
    with pytest.raises(ProfileMismatchError, match="shape"):
        handle.set_mixtures([[(bad_shape, 1.0)], []])
    unknown = LoraWeights({"model.nowhere": (torch.ones(2, 4), torch.ones(4, 2))}, 4.0, 2)
    with pytest.raises(ProfileMismatchError):
        handle.set_mixtures([(unknown, 1.0)])
    assert handle.state is None  # nothing was installed


def test_non_finite_weights_raise(tiny: nn.Module) -> None:
    prof = profile_from_model(tiny)
    lora = random_lora(prof, prof.module_names[:2], rank=2, alpha=4, seed=3)
    lora.factors[prof.module_names[1]][1][0, 0] = float("nan")
    handle = attach(tiny)
    with pytest.raises(NonFiniteWeightsError, match="NaN or Inf"):
        handle.set_mixtures([(lora, 1.0)])


@pytest.mark.parametrize(
    "mixtures, match",
    [
        ([("not weights", 1.0)], r"mixtures\[0\]"),
        ("text", "must be a list"),
    ],
)
def test_malformed_mixtures_raise(tiny: nn.Module, mixtures: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        attach(tiny).set_mixtures(mixtures)


def test_bad_weights_and_batch_mismatch_raise(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    handle = attach(tiny)
    with pytest.raises(InvalidInputError, match="finite"):
        handle.set_mixtures([(adapters[0], float("inf"))])
    handle.set_mixtures([[(adapters[3], 1.0)], [(adapters[1], 1.0)], []])
    with pytest.raises(InvalidInputError, match="3 per-row mixtures"):
        _logits(tiny, ids(2))


def test_zero_weight_and_empty_rows_are_the_base_model(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    x = ids(2)
    base = _logits(tiny, x)
    handle = attach(tiny)
    handle.set_mixtures([[(adapters[0], 0.0)], []])
    torch.testing.assert_close(_logits(tiny, x), base, rtol=0, atol=0)
    handle.set_mixtures([])
    assert handle.state is None


def test_cache_keeps_no_adapter_alive(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    import gc
    import weakref

    handle = attach(tiny)
    lora = adapters[2].clone()
    ref = weakref.ref(lora)
    handle.set_mixtures([(lora, 1.0)])
    handle.set_mixtures([(("k", 1), adapters[3].clone(), 1.0)])  # a keyed copy: no reference held either
    handle.clear()
    assert handle.cache_info()["entries"] == 2
    del lora
    gc.collect()
    assert ref() is None  # neither the validation record nor the stacks kept it alive
    assert handle.cache_info()["entries"] == 1 and len(handle.cache._validated) == 1
