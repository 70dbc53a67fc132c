"""The strict safetensors pre-parser: valid files pass and agree with the safetensors library."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from smoa.adapter.weights import LoraWeights
from smoa.errors import CorruptAdapterError, UnsafeAdapterFileError
from smoa.interop.safetensors_check import (
    check_safetensors_bytes,
    check_stored_bytes,
    inspect_safetensors_bytes,
    load_safetensors_bytes,
)

from .helpers import random_weights, raw_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_valid_adapter_bytes_pass_and_match_the_library(profile, dtype, tmp_path):
    data = random_weights(profile, dtype=dtype).to_bytes()
    header, problems = inspect_safetensors_bytes(data)
    assert problems == [] and header is not None
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:  # the library's own reading of the same header
        assert sorted(f.keys()) == sorted(t.name for t in header.tensors)
        assert f.metadata() == header.metadata
        for t in header.tensors:
            assert list(f.get_slice(t.name).get_shape()) == list(t.shape)
    check_safetensors_bytes(data, name="ok")
    check_stored_bytes(data, name="ok")


def test_load_returns_exact_tensors_in_file_order(profile):
    w = random_weights(profile, dtype=torch.bfloat16)
    tensors, meta = load_safetensors_bytes(w.to_bytes(), name="ok")
    assert meta["rank"] == "4" and float(meta["alpha"]) == 8.0
    assert LoraWeights.from_bytes(w.to_bytes()).factors.keys() == w.factors.keys()
    for m, (a, b) in w.factors.items():
        assert torch.equal(tensors[f"{m}.lora_A"], a) and torch.equal(tensors[f"{m}.lora_B"], b)
    begins = [t.begin for t in inspect_safetensors_bytes(w.to_bytes())[0].tensors]
    assert begins == sorted(begins)


def test_zero_sized_and_empty_files_are_valid():
    data = save({"z": torch.zeros(0, 4), "x": torch.ones(2)})
    tensors, _ = load_safetensors_bytes(data, name="zero")
    assert tensors["z"].shape == (0, 4) and torch.equal(tensors["x"], torch.ones(2))
    assert load_safetensors_bytes(raw_safetensors({}), name="empty")[0] == {}


def test_foreign_bytes_raise_unsafe_and_stored_bytes_raise_corrupt_with_every_problem():
    header = {
        "a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [-1], "data_offsets": [8, 12]},
        "__metadata__": {"k": 1},
    }
    data = raw_safetensors(header, b"\0" * 12)
    with pytest.raises(UnsafeAdapterFileError) as unsafe:
        check_safetensors_bytes(data, name="foreign.safetensors")
    assert unsafe.value.path == "foreign.safetensors"
    assert len(unsafe.value.problems) == 3
    text = str(unsafe.value)
    assert "'I64' is not allowed" in text and "negative dimension" in text and "`__metadata__`" in text
    with pytest.raises(CorruptAdapterError, match=r"ad_0001: stored weights are corrupt: 3 problem"):
        check_stored_bytes(data, name="ad_0001")
    with pytest.raises(CorruptAdapterError):
        load_safetensors_bytes(data, name="ad_0001", stored=True)


def test_problem_list_is_capped_but_counted():
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(50)}
    with pytest.raises(UnsafeAdapterFileError) as err:
        check_safetensors_bytes(raw_safetensors(header, b"\0" * 50), name="many")
    assert len(err.value.problems) == 21 and "and 30 more problem(s)" in err.value.problems[-1]


def test_header_cap_is_configurable(profile):
    data = random_weights(profile).to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    check_safetensors_bytes(data, name="x", max_header_bytes=n)
    with pytest.raises(UnsafeAdapterFileError, match=f"header length {n} exceeds the cap of {n - 1}"):
        check_safetensors_bytes(data, name="x", max_header_bytes=n - 1)


def test_accepts_bytearray_and_memoryview(profile):
    data = random_weights(profile, [profile.module_names[0]]).to_bytes()
    check_safetensors_bytes(bytearray(data), name="x")
    check_safetensors_bytes(memoryview(data), name="x")



def test_regression_unhashable_dtype_found_by_atheris():
    """atheris found ``{"dtype": {...}}`` raising TypeError (unhashable dict) instead of a clean refusal."""
    data = raw_safetensors(b'{"t":{"dtype":{"dtype":"F14","shape":[2,64]},"shape":[2],"data_offsets":[0,8]}}', bytes(8))
    with pytest.raises(UnsafeAdapterFileError, match=r"`dtype`=\{.*\} is not allowed"):
        check_safetensors_bytes(data, name="crash-326afc58")
