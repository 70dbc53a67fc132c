"""A generated corpus of malformed and hostile PEFT adapter directories (built in a temp dir at test time).

Each :class:`HostileCase` writes one adapter directory (from a valid base: two modules of the tiny Llama
profile, rank 4) with one defect, and names a regular expression that the refusal message must contain.
Pickle payloads and planted "code" write a sentinel file when unpickled/imported; the tests check that the
sentinel never appears. Nothing binary is committed: every file is produced here.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from smoa.interop.peft import peft_config_dict, peft_state_dict

from .helpers import random_weights, raw_safetensors, tiny_profile

PROFILE = tiny_profile()
MODULES = [PROFILE.module_names[0], PROFILE.module_names[2]]  # layer 0 q_proj, v_proj
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

Builder = Callable[[Path, Path], None]  # (adapter directory, sentinel path) -> None


@dataclass(frozen=True)
class HostileCase:
    """One hostile directory: ``build`` writes it, ``expect`` must match the error message."""

    name: str
    build: Builder
    expect: str
    kwargs: dict[str, Any] = field(default_factory=dict)


REFUSED: list[HostileCase] = []
WARNED: list[HostileCase] = []  # accepted, with a warning naming what was ignored


def valid_weights():
    return random_weights(PROFILE, MODULES, rank=4, alpha=8.0, seed=11)


def valid_tensors() -> dict[str, torch.Tensor]:
    return peft_state_dict(valid_weights())


def valid_config() -> dict[str, Any]:
    return peft_config_dict(valid_weights(), base_model_name_or_path="tiny-llama")


def write(d: Path, config: dict[str, Any] | bytes | None = None, weights: bytes | dict[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (valid ones where ``None``)."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = valid_config() if config is None else config
    (d / CONFIG).write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
    w = valid_tensors() if weights is None else weights
    (d / WEIGHTS).write_bytes(w if isinstance(w, bytes) else save(w, metadata={"format": "pt"}))


class SentinelWriter:
    """Unpickling this object calls ``open(path, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def sentinel_pickle(sentinel: Path) -> bytes:
    return pickle.dumps({"base_model.model.x.lora_A.weight": SentinelWriter(sentinel)})


def sentinel_module_source(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()\nclass Evil:\n    pass\n"


def refused(name: str, expect: str, **kwargs: Any) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        REFUSED.append(HostileCase(name, fn, expect, kwargs))
        return fn

    return register


def st_case(name: str, header: dict[str, Any] | bytes, buffer: bytes, expect: str) -> None:
    """A case whose safetensors file is hand-made raw bytes (the config is valid)."""
    REFUSED.append(HostileCase(name, lambda d, s: write(d, weights=raw_safetensors(header, buffer)), expect))


def raw_case(name: str, data: bytes, expect: str) -> None:
    REFUSED.append(HostileCase(name, lambda d, s: write(d, weights=data), expect))


def cfg_case(name: str, patch: dict[str, Any] | bytes, expect: str, drop: tuple[str, ...] = ()) -> None:
    """A case whose config is the valid one with ``patch`` applied (or raw bytes); weights are valid."""

    def build(d: Path, s: Path) -> None:
        if isinstance(patch, bytes):
            write(d, config=patch)
            return
        cfg = {k: v for k, v in valid_config().items() if k not in drop}
        cfg.update(patch)
        write(d, config=cfg)

    REFUSED.append(HostileCase(name, build, expect))


def tensor_case(name: str, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], expect: str) -> None:
    """A case with a well-formed safetensors file whose tensors are wrong for the profile/config."""
    REFUSED.append(HostileCase(name, lambda d, s: write(d, weights=edit(valid_tensors())), expect))


def _entry(dtype: str = "F32", shape: list[Any] | None = None, offsets: list[Any] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}


# -- safetensors structure -----------------------------------------------------------------------------------------
raw_case("empty-file", b"", r"0 byte\(s\), shorter than the 8-byte")
raw_case("five-bytes", b"\x01\x02\x03\x04\x05", r"shorter than the 8-byte")
raw_case("header-length-2MiB", struct.pack("<Q", 2 << 20) + b"{}", r"header length 2097152 exceeds the cap")
raw_case("header-length-u64-max", struct.pack("<Q", 2**64 - 1) + b"{}", r"exceeds the cap")
raw_case("header-length-past-eof", struct.pack("<Q", 1000) + b"{}" + bytes(20), r"header length 1000 exceeds the 22 byte")
st_case("header-not-json", b"{this is not json", b"", r"header is not valid JSON")
st_case("header-json-array", b"[1, 2, 3]", b"", r"does not start with '\{'")
st_case("header-json-string", b'"tensor"', b"", r"does not start with '\{'")
st_case("header-leading-space", b' {"a": 1}', b"", r"does not start with '\{'")
st_case("header-not-utf8", b'{"\xff\xfe": 1}', b"", r"not UTF-8")
st_case("header-nan-constant", b'{"x": NaN}', b"", r"non-standard JSON constant 'NaN'")
st_case("header-deep-nesting", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", r"nested too deeply")
st_case(
    "duplicate-tensor-key",
    b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
    bytes(16),
    r"header has duplicate key 'a'",
)
st_case("duplicate-field-key", b'{"a": {"dtype": "F32", "dtype": "I64", "shape": [2], "data_offsets": [0, 8]}}', bytes(8), r"header has duplicate key 'dtype'")
st_case("gap-between-tensors", {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[12, 20])}, bytes(20), r"gap of 4 byte\(s\)")
st_case("overlapping-tensors", {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])}, bytes(12), r"overlaps the previous tensor")
st_case("same-offsets-twice", {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[0, 8])}, bytes(8), r"overlaps")
st_case("offsets-past-buffer", {"a": _entry(offsets=[0, 8])}, bytes(4), r"out of range")
st_case("offsets-reversed", {"a": _entry(offsets=[8, 0])}, bytes(8), r"out of range")
st_case("offsets-negative", {"a": _entry(offsets=[-8, 0])}, bytes(8), r"out of range")
st_case("offsets-one-number", {"a": _entry(offsets=[8])}, bytes(8), r"`data_offsets` must be \[begin, end\]")
st_case("offsets-floats", {"a": _entry(offsets=[0.0, 8.0])}, bytes(8), r"`data_offsets` must be \[begin, end\]")
st_case("offsets-2-64", {"a": _entry(offsets=[0, 2**64])}, bytes(8), r"out of range")
st_case("shape-overflow-2-62", {"a": _entry(shape=[2**62, 2**62], offsets=[0, 8])}, bytes(8), r"needs more than 2\*\*64 bytes")
st_case("shape-2-64", {"a": _entry(shape=[2**64, 2], offsets=[0, 8])}, bytes(8), r"needs more than 2\*\*64 bytes")
st_case("shape-negative", {"a": _entry(shape=[-2, -1], offsets=[0, 8])}, bytes(8), r"negative dimension")
st_case("shape-not-list", {"a": _entry(shape="2")}, bytes(8), r"`shape` must be a list of integers")
st_case("shape-booleans", {"a": _entry(shape=[True, 2])}, bytes(8), r"`shape` must be a list of integers")
st_case("shape-nine-dims", {"a": _entry(shape=[1] * 9)}, bytes(8), r"9 dimensions")
st_case("shape-bytes-mismatch", {"a": _entry(shape=[4, 64], offsets=[0, 8])}, bytes(8), r"needs 1024 bytes but .* span 8")
st_case("trailing-bytes", {"a": _entry()}, bytes(8) + b"EXTRA", r"5 trailing byte\(s\)")
st_case("field-missing", {"a": {"dtype": "F32", "shape": [2]}}, bytes(8), r"missing field\(s\) `data_offsets`")
st_case("field-unknown", {"a": {**_entry(), "exec": "rm -rf /"}}, bytes(8), r"unknown field\(s\) 'exec'")
st_case("entry-not-object", {"a": [0, 8]}, bytes(8), r"entry must be a JSON object")
st_case("metadata-values-not-strings", {"__metadata__": {"alpha": 8}, "a": _entry()}, bytes(8), r"`__metadata__` values must be strings")
st_case("metadata-not-object", {"__metadata__": ["x"], "a": _entry()}, bytes(8), r"`__metadata__` must be a JSON object")
for _dtype in ("I64", "BOOL", "U8", "I32", "F8_E4M3", "C64", "float32"):
    st_case(f"dtype-{_dtype}", {"a": _entry(dtype=_dtype, shape=[8], offsets=[0, 8])}, bytes(8), rf"`dtype`='{_dtype}' is not allowed")
st_case("dtype-object", {"a": _entry(dtype={"dtype": "F32"})}, bytes(8), r'`dtype`=\{"dtype": "F32"\} is not allowed')  # atheris find
st_case("dtype-list", {"a": _entry(dtype=["F32"])}, bytes(8), r'`dtype`=\["F32"\] is not allowed')
st_case("dtype-null", {"a": _entry(dtype=None)}, bytes(8), r"`dtype`=null is not allowed")


def _truncations() -> None:
    data = save(valid_tensors(), metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 257, len(data) - 4, len(data) - 1):
        raw_case(f"truncated-at-{cut}", data[:cut], r"(shorter than|exceeds the|not valid JSON|out of range)")


_truncations()

# -- well-formed files with the wrong tensors ----------------------------------------------------------------------
A0 = f"base_model.model.{MODULES[0]}.lora_A.weight"
B0 = f"base_model.model.{MODULES[0]}.lora_B.weight"


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {**t, key: value}


def _put(key: str, index: tuple[int, int], value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key] = t[key].clone()
        t[key][index] = value
        return t

    return edit


def _rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


tensor_case("nan-in-lora-A", _put(A0, (0, 0), float("nan")), r"NaN or Inf in 1 tensor\(s\): '" + A0.replace(".", r"\."))
tensor_case("inf-in-lora-B", _put(B0, (3, 1), float("-inf")), r"NaN or Inf in 1 tensor")
tensor_case("wrong-shape-A", _set(A0, torch.zeros(4, 63)), r"lora_A has shape \[4, 63\], expected \[4, 64\]")
tensor_case("wrong-shape-B", _set(B0, torch.zeros(65, 4)), r"lora_B has shape \[65, 4\], expected \[64, 4\]")
tensor_case("transposed-A", _set(A0, torch.zeros(64, 4)), r"lora_A has shape \[64, 4\]")
tensor_case("rank-mismatch-one-module", lambda t: {**t, A0: torch.zeros(2, 64), B0: torch.zeros(64, 2)}, r"expected \[4, 64\] \(rank `r`=4\)")
tensor_case("three-dim-factor", _set(A0, torch.zeros(4, 64, 1)), r"lora_A has shape \[4, 64, 1\]")
tensor_case("dtype-mismatch-A-B", _set(B0, torch.zeros(64, 4, dtype=torch.float16)), r"lora_A is F32 but lora_B is F16")
tensor_case("module-not-in-profile", _rename("layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj"), r"module 'model\.layers\.7\.self_attn\.q_proj' is not a linear module")
tensor_case("lm-head-targeted", _rename("model.layers.0.self_attn.q_proj", "lm_head"), r"module 'lm_head' is not a linear module")
tensor_case("path-traversal-key", _rename("model.layers.0.self_attn.q_proj", "../../etc/passwd"), r"'\.\./\.\./etc/passwd' is not a linear module")
tensor_case("not-a-lora-key", _set("base_model.model.model.embed_tokens.weight", torch.zeros(2, 2)), r"is not a LoRA factor")
tensor_case("dora-magnitude", _set(f"base_model.model.{MODULES[0]}.lora_magnitude_vector", torch.ones(64)), r"lora_magnitude_vector' is not a LoRA factor")
tensor_case("no-prefix-keys", _rename("base_model.model.", ""), r"is not a LoRA factor")
tensor_case("missing-lora-B", lambda t: {k: v for k, v in t.items() if k != B0}, r"has lora_A but no lora_B")
tensor_case("two-adapter-names", lambda t: {k.replace(".lora_A.", ".lora_A.one.").replace(".lora_B.", ".lora_B.two."): v for k, v in t.items()}, r"different adapters")
tensor_case("no-tensors", lambda t: {}, r"holds no tensors")
tensor_case("int-tensor", _set(A0, torch.zeros(4, 64, dtype=torch.int32)), r"`dtype`='I32' is not allowed")
tensor_case(
    "module-not-in-target-modules",
    _rename("layers.0.self_attn.v_proj", "layers.0.mlp.up_proj"),
    r"'model\.layers\.0\.mlp\.up_proj' has tensors but is not in the config's `target_modules`",
)


# -- pickles: never opened -----------------------------------------------------------------------------------------
def _pickle_only(filename: str) -> Builder:
    def build(d: Path, sentinel: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG).write_text(json.dumps(valid_config()))
        if filename.endswith(".pt"):
            torch.save({"x": SentinelWriter(sentinel)}, d / filename)  # torch zip format, pickle inside
        else:
            (d / filename).write_bytes(sentinel_pickle(sentinel))

    return build


for _name in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pkl", "pytorch_model.bin", "adapter.ckpt"):
    REFUSED.append(HostileCase(f"pickle-{_name}", _pickle_only(_name), r"pickle-format weights .* refused"))

# -- adapter_config.json -------------------------------------------------------------------------------------------
cfg_case("config-huge", json.dumps({**valid_config(), "padding": "x" * 70_000}).encode(), r"`adapter_config\.json` is \d+ bytes, over the cap of 65536")
cfg_case("config-not-json", b"r = 4\nlora_alpha = 8\n", r"adapter_config\.json is not valid JSON")
cfg_case("config-json-array", b'["LORA", 4]', r"must hold a JSON object, got list")
cfg_case("config-not-utf8", b'{"peft_type": "LORA\xff"}', r"not UTF-8")
cfg_case("config-duplicate-r", b'{"peft_type": "LORA", "r": 4, "r": 64}', r"adapter_config\.json has duplicate key 'r'")
cfg_case("config-nan-alpha", b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', r"non-standard JSON constant")
cfg_case(
    "config-alpha-1e309-is-inf",
    json.dumps(valid_config()).replace('"lora_alpha": 8', '"lora_alpha": 1e309').encode(),
    r"`lora_alpha` must be a finite number in \(0, 1e\+06\], got inf",
)
cfg_case(
    "config-alpha-400-digit-int",
    json.dumps(valid_config()).replace('"lora_alpha": 8', '"lora_alpha": ' + "9" * 400).encode(),
    r"`lora_alpha` must be a finite number in \(0, 1e\+06\], got 9999",
)
cfg_case("config-alpha-pattern-400-digit-int", {"alpha_pattern": {"q_proj": 10**400}}, r"`alpha_pattern` sets per-module values")
cfg_case("config-peft-type-loha", {"peft_type": "LOHA"}, r"`peft_type` must be 'LORA', got 'LOHA'")
cfg_case("config-peft-type-missing", {}, r"`peft_type` must be 'LORA', got None", drop=("peft_type",))
cfg_case("config-r-missing", {}, r"`r` \(the LoRA rank\) is missing", drop=("r",))
cfg_case("config-r-zero", {"r": 0}, r"`r` must be an integer in 1\.\.4096, got 0")
cfg_case("config-r-negative", {"r": -4}, r"`r` must be an integer")
cfg_case("config-r-huge", {"r": 10**9}, r"`r` must be an integer in 1\.\.4096")
cfg_case("config-r-float", {"r": 4.0}, r"`r` must be an integer")
cfg_case("config-r-bool", {"r": True}, r"`r` must be an integer")
cfg_case("config-r-mismatch-tensors", {"r": 8}, r"expected \[8, 64\] \(rank `r`=8\)")
cfg_case("config-alpha-zero", {"lora_alpha": 0}, r"`lora_alpha` must be a finite number in \(0")
cfg_case("config-alpha-negative", {"lora_alpha": -8}, r"`lora_alpha` must be")
cfg_case("config-alpha-string", {"lora_alpha": "8"}, r"`lora_alpha` must be")
cfg_case("config-use-dora", {"use_dora": True}, r"`use_dora`=True is not supported")
cfg_case("config-bias-all", {"bias": "all"}, r"`bias`='all' is not supported")
cfg_case("config-modules-to-save", {"modules_to_save": ["lm_head"]}, r"`modules_to_save`=\['lm_head'\] is not supported")
cfg_case("config-rank-pattern-varies", {"rank_pattern": {"q_proj": 16}}, r"`rank_pattern` sets per-module values")
cfg_case("config-alpha-pattern-varies", {"alpha_pattern": {"v_proj": 32}}, r"`alpha_pattern` sets per-module values")
cfg_case("config-init-pissa", {"init_lora_weights": "pissa_niter_4"}, r"modifies the base model's weights")
cfg_case("config-init-loftq", {"init_lora_weights": "loftq"}, r"modifies the base model's weights")
cfg_case("config-init-astra", {"init_lora_weights": "astra", "astra_config": {"verbose": False}},
         r"modifies the base model's weights")  # fmt: skip
cfg_case("config-layer-replication", {"layer_replication": [[0, 2], [0, 2]]}, r"`layer_replication`.* is not supported")
cfg_case("config-lora-bias", {"lora_bias": True}, r"`lora_bias`=True is not supported")
cfg_case("config-trainable-tokens", {"trainable_token_indices": [1, 2]}, r"`trainable_token_indices`.* is not supported")
cfg_case("config-use-rslora-string", {"use_rslora": "yes"}, r"`use_rslora` must be true or false")
cfg_case("config-target-traversal", {"target_modules": ["../../etc/passwd"]}, r"not a module name \(path separators")
cfg_case("config-target-absolute", {"target_modules": ["/etc/passwd"]}, r"not a module name")
cfg_case("config-target-backslash", {"target_modules": ["..\\..\\windows\\system32"]}, r"not a module name")
cfg_case("config-target-nul", {"target_modules": ["q_proj\u0000"]}, r"not a module name")
cfg_case("config-target-regex-traversal", {"target_modules": "../.*"}, r"not an acceptable regex")
cfg_case("config-target-number", {"target_modules": 7}, r"`target_modules` must be a list of names or one regex")
cfg_case("config-target-missing", {}, r"`target_modules` is missing", drop=("target_modules",))
cfg_case("config-target-too-many", {"target_modules": ["q_proj"] * 5000}, r"5000 entries")
cfg_case("config-base-model-control-chars", {"base_model_name_or_path": "model\u001b[2J"}, r"contains control characters")
cfg_case("config-base-model-long", {"base_model_name_or_path": "a" * 5000}, r"5000 characters long")
cfg_case("config-base-model-not-string", {"base_model_name_or_path": {"path": "/"}}, r"`base_model_name_or_path` must be a string")


# -- the file system -----------------------------------------------------------------------------------------------
@refused("symlink-weights-escaping", r"`adapter_model\.safetensors` is a symlink that escapes the adapter directory")
def _symlink_weights(d: Path, sentinel: Path) -> None:
    write(d)
    outside = d.parent / "outside.safetensors"
    outside.write_bytes((d / WEIGHTS).read_bytes())
    (d / WEIGHTS).unlink()
    os.symlink(outside, d / WEIGHTS)


@refused("symlink-config-to-etc-passwd", r"`adapter_config\.json` is a symlink that escapes")
def _symlink_config(d: Path, sentinel: Path) -> None:
    write(d)
    (d / CONFIG).unlink()
    os.symlink("/etc/passwd", d / CONFIG)


@refused("symlink-relative-dotdot", r"symlink that escapes")
def _symlink_relative(d: Path, sentinel: Path) -> None:
    write(d)
    (d.parent / "cfg.json").write_text(json.dumps(valid_config()))
    (d / CONFIG).unlink()
    os.symlink("../cfg.json", d / CONFIG)


@refused("weights-is-a-directory", r"`adapter_model\.safetensors` is not a regular file")
def _weights_dir(d: Path, sentinel: Path) -> None:
    write(d)
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).mkdir()


@refused("weights-is-a-fifo", r"`adapter_model\.safetensors` is not a regular file")
def _weights_fifo(d: Path, sentinel: Path) -> None:
    write(d)
    (d / WEIGHTS).unlink()
    os.mkfifo(d / WEIGHTS)


@refused("weights-over-file-cap", r"over the cap of 1000", max_file_bytes=1000)
def _weights_big(d: Path, sentinel: Path) -> None:
    write(d)


@refused("config-over-custom-cap", r"`adapter_config\.json` is \d+ bytes, over the cap of 100", max_config_bytes=100)
def _config_big(d: Path, sentinel: Path) -> None:
    write(d)


@refused("config-missing", r"`adapter_config\.json` is missing")
def _no_config(d: Path, sentinel: Path) -> None:
    write(d)
    (d / CONFIG).unlink()


@refused("weights-missing", r"`adapter_model\.safetensors` is missing")
def _no_weights(d: Path, sentinel: Path) -> None:
    write(d)
    (d / WEIGHTS).unlink()


# -- accepted with a warning: code references and unknown keys are ignored, never imported ----------------------------
def _with_code(patch: dict[str, Any]) -> Builder:
    def build(d: Path, sentinel: Path) -> None:
        write(d, config={**valid_config(), **patch})
        (d / "modeling_evil.py").write_text(sentinel_module_source(sentinel))
        (d / "__init__.py").write_text(sentinel_module_source(sentinel))

    return build


WARNED += [
    HostileCase("auto-map", _with_code({"auto_map": {"AutoModel": "modeling_evil.Evil"}}), r"code reference `auto_map` ignored"),
    HostileCase(
        "auto-mapping",
        _with_code({"auto_mapping": {"base_model_class": "Evil", "parent_library": "modeling_evil"}}),
        r"code reference `auto_mapping` ignored",
    ),
    HostileCase("trust-remote-code", _with_code({"trust_remote_code": True}), r"code reference `trust_remote_code` ignored"),
    HostileCase("custom-class-key", _with_code({"model_class": "modeling_evil.Evil"}), r"code reference `model_class` ignored"),
    HostileCase("unknown-keys", _with_code({"exec": "import os", "hook": "x"}), r"unknown config key\(s\) dropped: `exec`, `hook`"),
    HostileCase(
        "pickle-beside-safetensors",
        lambda d, s: (write(d), (d / "adapter_model.bin").write_bytes(sentinel_pickle(s))),
        r"'adapter_model\.bin' ignored \(never opened\)",
    ),
]
