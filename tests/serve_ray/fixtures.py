"""Builders for the Ray tests: a tiny Llama model directory and a library of adapters with non-zero weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TOPICS = ("astronomy", "baking", "chess", "diving", "economics", "fencing", "geology", "hiking",
          "icebergs", "jazz", "knitting", "linguistics")  # fmt: skip
MODULES = ("q_proj", "v_proj")


def tiny_model_dir(root: Path) -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer, saved as an HF model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from smoa.models import default_model_dir, load_default_base_model

    if not (default_model_dir() / "tokenizer.json").exists():
        load_default_base_model()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits: fewer near-ties between greedy candidates
        model.lm_head.weight.mul_(8.0)
    out = root / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def adapter_weights(model: torch.nn.Module, seed: int, rank: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random non-zero factors for every q/v projection (large enough to change greedy tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(MODULES):
            out[name] = (torch.randn(rank, module.in_features, generator=g) * 0.5,
                         torch.randn(module.out_features, rank, generator=g) * 0.5)  # fmt: skip
    return out


def build_library(path: Path | str, model_dir: Path, topics: tuple[str, ...] = TOPICS, **cfg: Any) -> list[str]:
    """A library at ``path`` (hash encoder) holding one adapter per topic; returns their ids in topic order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smoa import SMoAConfig, SparseAdapterMixture

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = [adapter_weights(model, seed=i + 1) for i in range(len(topics))]  # before attach wraps the layers
    smoa = SparseAdapterMixture(SMoAConfig(storage_path=path, encoder="hash", seed=0, **cfg), base_model=model,
                                tokenizer=tokenizer)  # fmt: skip
    try:
        ids = []
        for i, topic in enumerate(topics):
            adapter = smoa.create_adapter_sync(domain_tags=[topic], description=f"questions about {topic}",
                                               examples=[f"tell me about {topic}", f"{topic} facts"],
                                               weights=weights[i], rank=4)  # fmt: skip
            ids.append(adapter.id)
        return ids
    finally:
        smoa.close()


def peft_directory(model_dir: Path, target: Path, seed: int = 7) -> Path:
    """A PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) made by ``peft`` itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(MODULES),
                                                  init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(target)
    return target
