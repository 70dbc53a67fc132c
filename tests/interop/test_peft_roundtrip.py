"""PEFT interop against the real ``peft`` package on tiny Llama and GPT-2 models.

Reference for every forward: the adapter applied by hand (``y = W x + s * B (A x)`` by a forward hook on each
targeted module) or merged as ``W + s * B A`` into a copy of the model — never smoa's own injection code.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from smoa.adapter.profile import BaseProfile, profile_from_model  # noqa: E402
from smoa.adapter.weights import LoraWeights  # noqa: E402
from smoa.errors import InvalidAdapterError, InvalidInputError  # noqa: E402
from smoa.interop import read_peft_dir, write_peft_dir  # noqa: E402

from .helpers import TINY, assert_same_weights, random_weights, tiny_profile  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))


@contextmanager
def hooked(model: torch.nn.Module, weights: LoraWeights) -> Iterator[torch.nn.Module]:
    """Apply ``weights`` by hand: each targeted module's output gains ``s * (x A^T) B^T``."""
    handles = []
    for module, (a, b) in weights.factors.items():
        def hook(_mod, inputs, out, a=a, b=b):  # x: [..., d_in] -> out: [..., d_out]
            x = inputs[0]
            return out + weights.scaling * ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T)

        handles.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def merged(model: torch.nn.Module, weights: LoraWeights, conv1d: bool = False) -> torch.nn.Module:
    """A copy of ``model`` with ``W += s * B A`` (``Conv1D`` stores ``W^T``)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in weights.factors:
            delta = weights.delta(module)  # [d_out, d_in]
            w = out.get_submodule(module).weight
            w += delta.T if conv1d else delta
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load_peft(model: torch.nn.Module, path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()


def test_tiny_profile_equals_the_model_profile(llama):
    assert profile_from_model(llama).modules == tiny_profile().modules


@pytest.mark.parametrize("kinds", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")])
def test_exported_llama_adapter_loads_in_peft_with_the_same_outputs(llama, ids, tmp_path, kinds):
    profile = tiny_profile()
    modules = [m for m in profile.module_names if m.endswith(kinds)]
    w = random_weights(profile, modules, rank=4, alpha=6.0, seed=1)
    path = write_peft_dir(w, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    got = logits(load_peft(llama, path), ids)
    with hooked(llama, w):
        by_hook = logits(llama, ids)
    by_merge = logits(merged(llama, w), ids)
    base = logits(llama, ids)
    assert (got - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, by_hook, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, by_merge, rtol=1e-4, atol=1e-4)


def test_exported_adapter_targets_only_its_own_modules(llama, tmp_path):
    profile = tiny_profile()
    only = [profile.module_names[0]]  # layer 0 q_proj, not layer 1's
    path = write_peft_dir(random_weights(profile, only), tmp_path / "a")
    model = load_peft(llama, path)
    lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
    assert lora_modules == ["base_model.model." + only[0]]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == only and cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_peft_saved_adapter_imports_bit_exact_and_gives_peft_outputs(llama, ids, tmp_path):
    model = copy.deepcopy(llama)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    pm = peft.get_peft_model(model, cfg).eval()
    pm.save_pretrained(str(tmp_path / "saved"))
    imported = read_peft_dir(tmp_path / "saved", tiny_profile())
    assert imported.rank == 3 and imported.alpha == 5.0 and imported.weights.scaling == 5 / 3
    assert imported.target_modules == [m for m in tiny_profile().module_names if m.endswith(("k_proj", "down_proj"))]
    assert sorted(imported.peft_target_modules) == ["down_proj", "k_proj"]
    for module, (a, b) in imported.weights.factors.items():
        layer = pm.base_model.model.get_submodule(module)
        assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)
    with hooked(llama, imported.weights):
        torch.testing.assert_close(logits(llama, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)
    # without task_type PEFT records the base class to import (`auto_mapping`): a code reference, ignored
    assert imported.warnings == ["code reference `auto_mapping` ignored (never imported or executed)"]


def test_round_trip_through_peft_is_bit_exact(llama, tmp_path):
    profile = tiny_profile()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = random_weights(profile, profile.module_names[::3], rank=2, alpha=0.1 + 1 / 3, seed=5, dtype=dtype)
        imported = read_peft_dir(write_peft_dir(w, tmp_path / str(dtype)), profile)
        assert_same_weights(imported.weights, w)
    # PEFT loads our file and saves it again: still the same factors
    w = random_weights(profile, profile.module_names[:4], seed=9)
    pm = load_peft(llama, write_peft_dir(w, tmp_path / "first"))
    pm.save_pretrained(str(tmp_path / "second"))
    assert_same_weights(read_peft_dir(tmp_path / "second", profile).weights, w)


def test_rslora_scaling_is_folded_into_alpha(llama, ids, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(llama), cfg).eval()
    pm.save_pretrained(str(tmp_path / "rs"))
    imported = read_peft_dir(tmp_path / "rs", tiny_profile())
    assert math.isclose(imported.weights.scaling, 8 / math.sqrt(4), rel_tol=1e-12)
    assert any("rsLoRA" in w for w in imported.warnings)
    with hooked(llama, imported.weights):
        torch.testing.assert_close(logits(llama, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_adapter_name_infix_keys_are_accepted(tmp_path):
    from safetensors.torch import load_file, save_file

    profile = tiny_profile()
    w = random_weights(profile, profile.module_names[:2])
    path = write_peft_dir(w, tmp_path / "a")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in tensors.items()}
    save_file(renamed, str(path / "adapter_model.safetensors"))
    assert_same_weights(read_peft_dir(path, profile).weights, w)


def gpt2_profile(model) -> BaseProfile:
    return profile_from_model(model, name="tiny-gpt2")


def test_gpt2_conv1d_export_and_import_with_fan_in_fan_out(gpt2, ids, tmp_path):
    profile = gpt2_profile(gpt2)
    modules = [m for m in profile.module_names if m.endswith(("c_attn", "c_fc"))]
    w = random_weights(profile, modules, rank=4, alpha=4.0, seed=2)
    path = write_peft_dir(w, tmp_path / "g", fan_in_fan_out=True, task_type="CAUSAL_LM")
    got = logits(load_peft(gpt2, path), ids)
    with hooked(gpt2, w):
        torch.testing.assert_close(got, logits(gpt2, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, logits(merged(gpt2, w, conv1d=True), ids), rtol=1e-4, atol=1e-4)
    # and a PEFT-trained GPT-2 adapter (fan_in_fan_out=True) comes back exact
    torch.manual_seed(6)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(gpt2), cfg).eval()
    pm.save_pretrained(str(tmp_path / "peft-gpt2"))
    imported = read_peft_dir(tmp_path / "peft-gpt2", profile)
    with hooked(gpt2, imported.weights):
        torch.testing.assert_close(logits(gpt2, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_pickle_beside_safetensors_is_ignored_with_a_warning(tmp_path):
    profile = tiny_profile()
    w = random_weights(profile, profile.module_names[:1])
    path = write_peft_dir(w, tmp_path / "a")
    (path / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    imported = read_peft_dir(path, profile)
    assert any("adapter_model.bin" in m and "never opened" in m for m in imported.warnings)


def test_write_refuses_non_empty_directory_unless_overwrite(tmp_path):
    profile = tiny_profile()
    w1, w2 = random_weights(profile, profile.module_names[:1], seed=1), random_weights(profile, profile.module_names[:2], seed=2)
    path = write_peft_dir(w1, tmp_path / "a")
    with pytest.raises(InvalidInputError, match="non-empty directory"):
        write_peft_dir(w2, path)
    assert_same_weights(read_peft_dir(path, profile).weights, w1)  # untouched
    write_peft_dir(w2, path, overwrite=True)
    assert_same_weights(read_peft_dir(path, profile).weights, w2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old directory left
    (tmp_path / "empty").mkdir()
    write_peft_dir(w1, tmp_path / "empty")  # an empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a directory"):
        write_peft_dir(w1, tmp_path / "file", overwrite=True)


def test_write_refuses_inconsistent_weights(tmp_path):
    profile = tiny_profile()
    w = random_weights(profile, profile.module_names[:2])
    bad = w.clone()
    bad.factors[profile.module_names[0]][1][0, 0] = float("nan")
    with pytest.raises(InvalidAdapterError, match="NaN or Inf in B"):
        write_peft_dir(bad, tmp_path / "nan")
    with pytest.raises(InvalidAdapterError, match="not a module name"):
        write_peft_dir(LoraWeights({"../../etc/x": w.factors[profile.module_names[0]]}, 8.0, 4), tmp_path / "name")
    with pytest.raises(InvalidAdapterError, match="`alpha`"):
        write_peft_dir(LoraWeights(w.factors, float("inf"), 4), tmp_path / "alpha")
    assert not any(tmp_path.iterdir())  # nothing written for a refused adapter
