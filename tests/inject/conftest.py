"""Fixtures of the inject tests: every model-level test runs on a tiny Llama and a tiny GPT-2 (Conv1D)."""

from __future__ import annotations

import pytest
import torch.nn as nn

from smoa.adapter.profile import profile_from_model
from smoa.adapter.weights import LoraWeights

from .inject_helpers import MODELS, random_lora


@pytest.fixture(params=sorted(MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(model_name: str) -> nn.Module:
    return MODELS[model_name]()


@pytest.fixture
def adapters(tiny: nn.Module) -> list[LoraWeights]:
    """Five adapters with different ranks, alphas and module sets on the tiny model."""
    prof = profile_from_model(tiny)
    names = prof.module_names
    sets = [names[::3], names[1::2], names[:4], names, names[-3:]]
    return [random_lora(prof, mods, rank=1 + i % 3, alpha=2.0 + i, seed=100 + i) for i, mods in enumerate(sets)]
