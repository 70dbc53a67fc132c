"""Helpers of the interop tests: a tiny Llama profile and random LoRA weights for it."""

from __future__ import annotations

import os

import torch

from smoa.adapter.profile import BaseProfile, llama_profile
from smoa.adapter.weights import LoraWeights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def tiny_profile() -> BaseProfile:
    """Equal (modules and shapes) to ``profile_from_model`` of ``LlamaForCausalLM(LlamaConfig(**TINY))``."""
    return llama_profile("tiny-llama", n_layers=2, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2)


def random_weights(
    profile: BaseProfile,
    modules: list[str] | None = None,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> LoraWeights:
    """LoRA factors with both A and B random (a zero B would hide a wrong B in every comparison)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules if modules is not None else profile.module_names:
        d_in, d_out = profile.shape(m)
        a = (torch.randn(rank, d_in, generator=g) * scale).to(dtype)
        b = (torch.randn(d_out, rank, generator=g) * scale).to(dtype)
        factors[m] = (a, b)
    return LoraWeights(factors, float(alpha), rank)


def assert_same_weights(x: LoraWeights, y: LoraWeights) -> None:
    """Bit-exact equality: modules, order, dtypes, values, alpha and rank."""
    assert list(x.factors) == list(y.factors)
    assert x.rank == y.rank and x.alpha == y.alpha
    for m in x.factors:
        for t, u in zip(x.factors[m], y.factors[m]):
            assert t.dtype == u.dtype and t.shape == u.shape, m
            assert torch.equal(t, u), m


def raw_safetensors(header: dict | bytes, buffer: bytes = b"") -> bytes:
    """Hand-made safetensors bytes: u64 little-endian header length, header, buffer (no checks at all)."""
    import json
    import struct

    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + buffer
