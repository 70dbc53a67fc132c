"""`InferenceEngine` on token ids: padding, per-row mixtures, loss and generation against single-row runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smoa.adapter.weights import LoraWeights
from smoa.errors import InvalidInputError
from smoa.inject import InferenceEngine

from .inject_helpers import ids

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _rows(a: list[LoraWeights]) -> list[list[tuple[LoraWeights, float]]]:
    return [[(a[0], 1.0)], [], [(a[1], 0.5), (a[2], 0.5), (a[3], 0.5)]]


def test_forward_pads_right_and_rows_match_alone(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    engine = InferenceEngine(tiny)
    seqs = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13]]
    mixtures = _rows(adapters)
    with torch.no_grad():
        out = engine.forward(seqs, mixtures).logits
        assert out.shape == (3, 5, 256)
        for r, (seq, mix) in enumerate(zip(seqs, mixtures)):
            alone = engine.forward([seq], [mix]).logits
            torch.testing.assert_close(out[r, : len(seq)], alone[0], **TOL)


def test_loss_is_per_row_mean_token_nll(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    engine = InferenceEngine(tiny)
    seqs = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13]]
    mixtures = _rows(adapters)
    with torch.no_grad():
        nll = engine.loss(seqs, mixtures)
        for r, (seq, mix) in enumerate(zip(seqs, mixtures)):
            with engine.use(mix):
                logits = tiny(input_ids=torch.tensor([seq])).logits[0]
            want = F.cross_entropy(logits[:-1], torch.tensor(seq[1:]))
            torch.testing.assert_close(nll[r], want, **TOL)


def test_generate_per_row_equals_alone(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    engine = InferenceEngine(tiny)
    x = ids(3, length=6, seed=4)
    mixtures = _rows(adapters)
    out = engine.generate(x, mixtures, max_new_tokens=5)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 11)
    for r, mix in enumerate(mixtures):
        assert torch.equal(out[r : r + 1], engine.generate(x[r : r + 1], mix, max_new_tokens=5))
    assert engine.handle.state is None  # restored after the call


def test_engine_refuses_bad_inputs(tiny: nn.Module, adapters: list[LoraWeights]) -> None:
    engine = InferenceEngine(tiny)
    with pytest.raises(InvalidInputError, match="per-row mixtures for 2 inputs"):
        engine.forward(ids(2), _rows(adapters))
    with pytest.raises(InvalidInputError, match="tokenizer"):
        engine.forward(["some text"], [])
    with pytest.raises(InvalidInputError, match="token ids"):
        engine.forward([[1, 2], "mixed"], [])
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        engine.generate(ids(1), [], max_new_tokens=0)


def test_profile_is_the_attached_modules(tiny: nn.Module) -> None:
    engine = InferenceEngine(tiny, target_modules=r".*\.(q_proj|c_attn)")
    assert len(engine.profile) == 2
    assert all(m.endswith(("q_proj", "c_attn")) for m in engine.profile.module_names)
    engine.detach()
