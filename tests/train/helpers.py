"""A tiny Llama built from a config and a word-level tokenizer made in memory (no download)."""

from __future__ import annotations

import torch
import torch.nn as nn

TOPICS = {
    "weather": ["rain falls on the hills today", "the wind and rain will stay cold", "sun returns after the storm",
                "cold clouds bring snow to the north", "warm sun and light wind by the coast"],
    "cooking": ["stir the soup and add salt", "bake the bread in a hot oven", "chop onions and fry them in oil",
                "boil pasta then add the sauce", "whisk eggs with sugar and butter"],
    "finance": ["shares rose as the bank cut rates", "the market fell after profits slipped",
                "investors sold bonds and bought gold", "the firm reported higher quarterly profits",
                "rates and inflation moved the stock market"],
}  # fmt: skip


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer():  # noqa: ANN201 - transformers type
    """Word-level tokenizer over the words of :data:`TOPICS` (+ specials), vocab < 256, pads with [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for texts in TOPICS.values() for t in texts for w in t.split()})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
