"""Property tests (hypothesis): exact round trips, and byte mutations that end in a result or a clean error.

* Any valid :class:`LoraWeights` survives ``to_bytes -> check -> from_bytes`` and
  ``write_peft_dir -> read_peft_dir`` bit for bit (``-0.0``, subnormals and dtype extremes included).
* Any mutation of a valid file (flipped bytes, truncation, insertion, a forged header length) gives either a
  valid adapter or a :class:`SmoaError` — never another exception — and whenever the pre-check accepts a
  file, the safetensors library accepts it too (the check is at least as strict as the library).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from smoa.adapter.weights import LoraWeights
from smoa.errors import SmoaError, UnsafeAdapterFileError
from smoa.interop import read_peft_bytes, read_peft_dir, write_peft_dir
from smoa.interop.peft import peft_config_dict, peft_state_dict
from smoa.interop.peft_config import parse_peft_config
from smoa.interop.safetensors_check import check_safetensors_bytes, inspect_safetensors_bytes, load_safetensors_bytes

from .helpers import tiny_profile

PROFILE = tiny_profile()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bit_exact(x: LoraWeights, y: LoraWeights) -> None:
    assert list(x.factors) == list(y.factors) and x.rank == y.rank and x.alpha == y.alpha
    for m in x.factors:
        for t, u in zip(x.factors[m], y.factors[m]):
            assert t.dtype == u.dtype and t.shape == u.shape
            assert torch.equal(bits(t), bits(u)), m


@st.composite
def lora_weights(draw: st.DrawFn) -> LoraWeights:
    names = PROFILE.module_names
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    modules = [m for m in names if m in chosen]
    rank = draw(st.integers(1, 6))
    alpha = draw(st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    info = torch.finfo(dtype)
    # +-info.max is no longer here on purpose: a factor that large makes alpha / r * B @ A overflow, and such
    # weights are refused (issue 10: no NaN logits from finite factors); tests/core_edges covers the refusal.
    specials = [0.0, -0.0, info.tiny, -10.0, 10.0, info.eps, info.tiny / 4 if dtype != torch.bfloat16 else 0.0]
    factors = {}
    for m in modules:
        d_in, d_out = PROFILE.shape(m)
        pair = []
        for shape in ((rank, d_in), (d_out, rank)):
            t = torch.randn(*shape, generator=g).to(dtype)
            for _ in range(draw(st.integers(0, 3))):  # a few exact special values at random places
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(specials))
            pair.append(t)
        factors[m] = (pair[0], pair[1])
    return LoraWeights(factors, alpha, rank)


@FAST
@given(lora_weights())
def test_bytes_round_trip_is_exact(w):
    data = w.to_bytes()
    check_safetensors_bytes(data, name="w")
    assert_bit_exact(LoraWeights.from_bytes(data), w)


@FAST
@given(lora_weights())
def test_peft_directory_round_trip_is_exact(w):
    with tempfile.TemporaryDirectory() as tmp:
        imported = read_peft_dir(write_peft_dir(w, Path(tmp) / "a"), PROFILE)
    assert_bit_exact(imported.weights, w)
    assert imported.target_modules == list(w.factors) and imported.warnings == []


# -- mutations -------------------------------------------------------------------------------------------------------
_G = torch.Generator().manual_seed(0)
BASE_W = LoraWeights(
    {m: (torch.randn(2, PROFILE.shape(m)[0], generator=_G), torch.randn(PROFILE.shape(m)[1], 2, generator=_G)) for m in PROFILE.module_names[:3]},
    4.0,
    2,
)
BASE_BYTES = save(peft_state_dict(BASE_W), metadata={"format": "pt"})
BASE_CONFIG = json.dumps(peft_config_dict(BASE_W)).encode()
HEADER_END = 8 + struct.unpack("<Q", BASE_BYTES[:8])[0]


@st.composite
def mutated(draw: st.DrawFn, data: bytes, hot_end: int) -> bytes:
    """``data`` with 1-4 mutations, positions biased to the first ``hot_end`` bytes (the header)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.one_of(st.integers(0, hot_end), st.integers(0, max(len(out), 1))))
        kind = draw(st.sampled_from(["set", "truncate", "insert", "delete", "length"]))
        if kind == "set" and pos < len(out):
            out[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        elif kind == "length" and len(out) >= 8:
            out[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(out)))))
    return bytes(out)


MUTATION = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@MUTATION
@given(mutated(BASE_BYTES, HEADER_END))
def test_mutated_safetensors_give_a_result_or_a_clean_error(data):
    header, problems = inspect_safetensors_bytes(data)
    event("accepted" if header is not None else "refused")
    assert (header is None) == bool(problems)
    try:
        tensors, _ = load_safetensors_bytes(data, name="m")
    except UnsafeAdapterFileError as exc:
        assert header is None, f"pre-check passed but the library refused: {exc}"  # never laxer than safetensors
        return
    assert header is not None and set(tensors) == {t.name for t in header.tensors}


@MUTATION
@given(mutated(BASE_BYTES, HEADER_END))
def test_mutated_weights_import_cleanly_or_refuse(data):
    try:
        imported = read_peft_bytes(BASE_CONFIG, data, PROFILE)
    except SmoaError:
        return
    imported.weights.validate(PROFILE)  # whatever is accepted is a valid, finite adapter


@MUTATION
@given(mutated(BASE_CONFIG, len(BASE_CONFIG)))
def test_mutated_config_imports_cleanly_or_refuses(config):
    settings_, problems = parse_peft_config(config)
    assert (settings_ is None) == bool(problems)
    try:
        imported = read_peft_bytes(config, BASE_BYTES, PROFILE)
    except SmoaError:
        return
    assert imported.rank == 2 and imported.weights.scaling > 0


@MUTATION
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_foreign_exceptions(data):
    for config, weights in ((data, BASE_BYTES), (BASE_CONFIG, data), (data, data)):
        try:
            read_peft_bytes(config, weights, PROFILE)
        except SmoaError:
            pass


# -- structure-aware: adversarial JSON values in known fields --------------------------------------------------------
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**5), 10**5),
    st.integers(-(10**600), 10**600),  # past float range: float(x) raises OverflowError
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["LORA", "none", "all", "F32", "I64", "pissa", "q_proj", "../x", "\x00"]),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
CONFIG_KEYS = sorted(json.loads(BASE_CONFIG)) + ["auto_map", "use_dora", "lora_bias", "layer_replication", "unknown"]


@MUTATION
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=4))
def test_adversarial_config_values_refuse_cleanly(patch):
    config = json.dumps({**json.loads(BASE_CONFIG), **patch}).encode()
    try:
        read_peft_bytes(config, BASE_BYTES, PROFILE)
    except SmoaError:
        pass


@MUTATION
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["dtype", "shape", "data_offsets", None]), JSON_VALUES), min_size=1, max_size=3))
def test_adversarial_header_fields_refuse_cleanly(edits):
    n = HEADER_END - 8
    header = json.loads(BASE_BYTES[8:HEADER_END])
    names = sorted(header)
    for index, field_, value in edits:
        name = names[index % len(names)]
        if field_ is None or not isinstance(header[name], dict):
            header[name] = value
        else:
            header[name][field_] = value
    head = json.dumps(header).encode()
    data = struct.pack("<Q", len(head)) + head + BASE_BYTES[8 + n :]
    accepted = inspect_safetensors_bytes(data)[0] is not None
    try:
        load_safetensors_bytes(data, name="h")
    except UnsafeAdapterFileError:
        assert not accepted, "pre-check passed but the library refused"
