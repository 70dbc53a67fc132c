from __future__ import annotations

import pytest
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from smoa.adapter.granularity import lora_param_count, select_modules
from smoa.adapter.profile import default_profile, profile_from_model
from smoa.config import AdapterGranularity
from smoa.errors import InvalidInputError


def test_nano_rank2_on_default_profile_is_in_range() -> None:
    p = default_profile()
    mods = select_modules(p, AdapterGranularity.NANO, 2)
    n = lora_param_count(p, mods, 2)
    assert n == sum(2 * (576 + 192) for _ in mods) == 4608
    assert 1_000 <= n <= 10_000
    assert all(m.endswith("v_proj") for m in mods)


@pytest.mark.parametrize("gran,rank", [(AdapterGranularity.MICRO, 4), (AdapterGranularity.SMALL, 8),
                                       (AdapterGranularity.MEDIUM, 16)])  # fmt: skip
def test_each_granularity_lands_in_its_range(gran: AdapterGranularity, rank: int) -> None:
    p = default_profile()
    lo, hi = gran.param_range
    assert lo <= lora_param_count(p, select_modules(p, gran, rank), rank) <= hi


def test_default_profile_equals_real_llama_layout() -> None:
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=32)  # fmt: skip
    real = profile_from_model(LlamaForCausalLM(cfg))
    expected = [m for m in default_profile().modules if ".layers.0." in m[0] or ".layers.1." in m[0]]
    assert list(real.modules) == expected


def test_gpt2_conv1d_profile_and_nano() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50, n_positions=32))
    p = profile_from_model(model)
    assert ("transformer.h.0.attn.c_attn", 64, 192) in p.modules
    mods = select_modules(p, AdapterGranularity.NANO, 2)
    assert 1_000 <= lora_param_count(p, mods, 2) <= 10_000


def test_impossible_rank_names_rank() -> None:
    p = profile_from_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(InvalidInputError, match="`rank`=1"):
        select_modules(p, AdapterGranularity.NANO, 1)
