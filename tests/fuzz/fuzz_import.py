"""atheris fuzz target for smoa's untrusted-adapter import (bytes only; no file system).

The first input byte picks the path under test, the rest is the payload:

* ``0``: ``load_safetensors_bytes`` — the strict pre-check, then the safetensors parser.
* ``1``: ``parse_peft_config`` — the ``adapter_config.json`` reader.
* ``2``: ``read_peft_bytes`` with the payload as weights and a valid config.
* ``3``: ``read_peft_bytes`` with the payload as config and valid weights.
* ``4``: structure-aware: a config whose known keys get adversarial JSON values (huge ints, nested objects,
  lists, odd strings), through ``read_peft_bytes``.
* ``5``: structure-aware: a safetensors header whose fields get adversarial JSON values, through the pre-check
  and the safetensors parser (the differential check of mode 0).

Any exception other than :class:`smoa.errors.SmoaError` is a finding (atheris reports it and exits non-zero),
as is a pre-check that accepts bytes the safetensors library refuses.

Run: ``python tests/fuzz/fuzz_import.py -max_total_time=60 [corpus_dir]``. ``--seed-corpus DIR`` writes valid
seed inputs for each path into DIR and exits.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atheris  # noqa: E402
import torch  # noqa: E402  (imported before instrumentation: only smoa's code is instrumented)
from safetensors.torch import save  # noqa: E402

from smoa.adapter.profile import llama_profile  # noqa: E402  (the package itself, not instrumented)
from smoa.adapter.weights import LoraWeights  # noqa: E402
from smoa.errors import SmoaError, UnsafeAdapterFileError  # noqa: E402

with atheris.instrument_imports(include=["smoa.interop"]):  # coverage feedback from the import code only
    from smoa.interop.peft import peft_config_dict, peft_state_dict, read_peft_bytes
    from smoa.interop.peft_config import parse_peft_config
    from smoa.interop.safetensors_check import inspect_safetensors_bytes, load_safetensors_bytes

PROFILE = llama_profile("tiny-llama", n_layers=2, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2)
_G = torch.Generator().manual_seed(0)
WEIGHTS = LoraWeights({m: (torch.randn(2, 64, generator=_G), torch.randn(PROFILE.shape(m)[1], 2, generator=_G)) for m in PROFILE.module_names[:2]}, 4.0, 2)
VALID_WEIGHTS = save(peft_state_dict(WEIGHTS), metadata={"format": "pt"})
VALID_CONFIG = json.dumps(peft_config_dict(WEIGHTS)).encode()


CONFIG_KEYS = sorted(json.loads(VALID_CONFIG)) + ["auto_map", "use_dora", "lora_bias", "layer_replication", "x"]
WORDS = ["LORA", "none", "all", "F32", "BF16", "I64", "pissa", "gaussian", "q_proj", "../x", "", "\x00", "model.layers.0.self_attn.q_proj"]


def fuzz_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    """An adversarial JSON value: the kinds that break naive field checks (unhashable, huge, non-finite)."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-5, 5000)
    if kind == 3:
        return (-1) ** fdp.ConsumeIntInRange(0, 1) * 10 ** fdp.ConsumeIntInRange(1, 600) + fdp.ConsumeIntInRange(0, 9)
    if kind == 4:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 6:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if kind == 7:
        return [fuzz_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 8:
        return {WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]: fuzz_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    return [] if fdp.ConsumeBool() else {}


def structured_config(fdp: atheris.FuzzedDataProvider) -> bytes:
    cfg = json.loads(VALID_CONFIG)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        cfg[CONFIG_KEYS[fdp.ConsumeIntInRange(0, len(CONFIG_KEYS) - 1)]] = fuzz_value(fdp)
    return json.dumps(cfg, allow_nan=True).encode()


def structured_safetensors(fdp: atheris.FuzzedDataProvider) -> bytes:
    n = int.from_bytes(VALID_WEIGHTS[:8], "little")
    header = json.loads(VALID_WEIGHTS[8 : 8 + n])
    names = sorted(header)
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        name = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
        field = ["dtype", "shape", "data_offsets", None][fdp.ConsumeIntInRange(0, 3)]
        if field is None or not isinstance(header[name], dict):
            header[name] = fuzz_value(fdp)
        else:
            header[name][field] = fuzz_value(fdp)
    head = json.dumps(header, allow_nan=True).encode()
    return len(head).to_bytes(8, "little") + head + VALID_WEIGHTS[8 + n :]


def differential(payload: bytes) -> None:
    """The pre-check must never accept what the safetensors library refuses."""
    header, _ = inspect_safetensors_bytes(payload)
    try:
        load_safetensors_bytes(payload, name="fuzz")
    except UnsafeAdapterFileError:
        if header is not None:
            raise AssertionError("pre-check accepted bytes that the safetensors library refused") from None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0] % 6, data[1:]
    try:
        if mode == 0:
            differential(payload)
        elif mode == 4:
            read_peft_bytes(structured_config(atheris.FuzzedDataProvider(payload)), VALID_WEIGHTS, PROFILE)
        elif mode == 5:
            differential(structured_safetensors(atheris.FuzzedDataProvider(payload)))
        elif mode == 1:
            settings, problems = parse_peft_config(payload)
            if (settings is None) != bool(problems):
                raise AssertionError("parse_peft_config returned both or neither of settings and problems")
        elif mode == 2:
            read_peft_bytes(VALID_CONFIG, payload, PROFILE).weights.validate(PROFILE)
        else:
            read_peft_bytes(payload, VALID_WEIGHTS, PROFILE)
    except SmoaError:
        pass


def write_seed_corpus(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    seeds = {"st": b"\x00" + VALID_WEIGHTS, "cfg": b"\x01" + VALID_CONFIG, "w": b"\x02" + VALID_WEIGHTS, "c": b"\x03" + VALID_CONFIG}
    seeds.update({f"s{m}-{i}": bytes([m]) + random.Random(10 * m + i).randbytes(64) for m in (4, 5) for i in range(4)})
    for name, blob in seeds.items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(blob)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        write_seed_corpus(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
