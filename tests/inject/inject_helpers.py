"""Tiny models built from configs, random adapters with non-zero factors and a PEFT reference builder."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


MODELS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def random_lora(
    profile: BaseProfile, modules: Sequence[str], rank: int, alpha: float, seed: int, scale: float = 0.2
) -> LoraWeights:
    """A LoRA with random non-zero A and B (so every adapter visibly changes the output)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules:
        d_in, d_out = profile.shape(m)
        factors[m] = (torch.randn(rank, d_in, generator=g) * scale, torch.randn(d_out, rank, generator=g) * scale)
    return LoraWeights(factors, float(alpha), rank)


def ids(batch: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_model(model: nn.Module, loras: dict[str, LoraWeights]):  # noqa: ANN201 - peft type
    """A real PEFT PeftModel on a copy of ``model`` holding ``loras`` (factors copied in)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(model)
    pm = None
    for name, w in loras.items():
        cfg = LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=list(w.modules), lora_dropout=0.0,
                         fan_in_fan_out=type(model).__name__.startswith("GPT2"))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if pm is None:
                pm = get_peft_model(base, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
        for m, (a, b) in w.factors.items():
            layer = pm.base_model.model.get_submodule(m)
            layer.lora_A[name].weight.data.copy_(a)
            layer.lora_B[name].weight.data.copy_(b)
    assert pm is not None
    return pm.eval()
