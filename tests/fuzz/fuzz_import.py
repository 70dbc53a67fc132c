"""atheris fuzz target for smoa's untrusted-adapter import (bytes only; no file system).

The first input byte picks the path under test, the rest is the payload:

* ``0``: ``load_safetensors_bytes`` — the strict pre-check, then the safetensors parser.
* ``1``: ``parse_peft_config`` — the ``adapter_config.json`` reader.
* ``2``: ``read_peft_bytes`` with the payload as weights and a valid config.
* ``3``: ``read_peft_bytes`` with the payload as config and valid weights.

Any exception other than :class:`smoa.errors.SmoaError` is a finding (atheris reports it and exits non-zero),
as is a pre-check that accepts bytes the safetensors library refuses.

Run: ``python tests/fuzz/fuzz_import.py -max_total_time=60 [corpus_dir]``. ``--seed-corpus DIR`` writes valid
seed inputs for each path into DIR and exits.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atheris  # noqa: E402
import torch  # noqa: E402  (imported before instrumentation: only smoa's code is instrumented)
from safetensors.torch import save  # noqa: E402

with atheris.instrument_imports(include=["smoa.interop"]):
    from smoa.adapter.profile import llama_profile
    from smoa.adapter.weights import LoraWeights
    from smoa.errors import SmoaError, UnsafeAdapterFileError
    from smoa.interop.peft import peft_config_dict, peft_state_dict, read_peft_bytes
    from smoa.interop.peft_config import parse_peft_config
    from smoa.interop.safetensors_check import inspect_safetensors_bytes, load_safetensors_bytes

PROFILE = llama_profile("tiny-llama", n_layers=2, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2)
_G = torch.Generator().manual_seed(0)
WEIGHTS = LoraWeights({m: (torch.randn(2, 64, generator=_G), torch.randn(PROFILE.shape(m)[1], 2, generator=_G)) for m in PROFILE.module_names[:2]}, 4.0, 2)
VALID_WEIGHTS = save(peft_state_dict(WEIGHTS), metadata={"format": "pt"})
VALID_CONFIG = json.dumps(peft_config_dict(WEIGHTS)).encode()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0] % 4, data[1:]
    try:
        if mode == 0:
            header, _ = inspect_safetensors_bytes(payload)
            try:
                load_safetensors_bytes(payload, name="fuzz")
            except UnsafeAdapterFileError:
                if header is not None:
                    raise AssertionError("pre-check accepted bytes that the safetensors library refused") from None
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
