"""Small real parts for the core-edge tests: a tiny Llama from a config and an in-memory word tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smoa import SMoAConfig, SparseAdapterMixture

WORDS = "the a rain sun cold warm soup bread oven salt bank market rates stock shares medical doctor code".split()


def tiny_llama(context: int = 128, seed: int = 0) -> nn.Module:
    """A 2-layer Llama (hidden 64, vocab 64) whose context is ``context`` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=context)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer() -> Any:
    """Word-level tokenizer over :data:`WORDS` (+ specials), pads with [PAD]; unknown words -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def open_lib(path: Path | str | None = None, **kw: Any) -> SparseAdapterMixture:
    """A library on the default profile with the fast hash encoder."""
    kw.setdefault("encoder", "hash")
    return SparseAdapterMixture(SMoAConfig(storage_path=path, **kw))


def with_model(path: Path | str | None = None, context: int = 128, **kw: Any) -> SparseAdapterMixture:
    """A library whose profile is the tiny Llama's, with the model and tokenizer attached."""
    kw.setdefault("encoder", "hash")
    return SparseAdapterMixture(SMoAConfig(storage_path=path, **kw), base_model=tiny_llama(context),
                                tokenizer=word_tokenizer())  # fmt: skip
