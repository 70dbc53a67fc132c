"""Every file of the generated hostile corpus is refused with a clear error; nothing runs, nothing changes.

The corpus (``hostile_corpus.py``) is built in ``tmp_path`` at test time. For each refused case the test checks
the error type, that the message names the problem, that no sentinel file appeared (pickles and planted code
write one when loaded), and that the directory was left exactly as it was.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import pytest

from smoa.errors import SmoaError, UnsafeAdapterFileError
from smoa.interop import read_peft_dir, write_peft_dir

from .helpers import assert_same_weights
from .hostile_corpus import (
    MODULES,
    PROFILE,
    REFUSED,
    WARNED,
    HostileCase,
    sentinel_module_source,
    sentinel_pickle,
    valid_weights,
)


def snapshot(d: Path) -> dict[str, tuple[int, int, int]]:
    """Names, modes, sizes and mtimes of everything under ``d`` (symlinks not followed)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), d)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def build(case: HostileCase, tmp_path: Path) -> tuple[Path, Path]:
    d, sentinel = tmp_path / "adapter", tmp_path / "SENTINEL"
    case.build(d, sentinel)
    return d, sentinel


def test_corpus_is_large_and_names_are_unique():
    names = [c.name for c in REFUSED + WARNED]
    assert len(REFUSED) >= 50, len(REFUSED)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_hostile_adapter_is_refused(case, tmp_path):
    d, sentinel = build(case, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeAdapterFileError) as err:
        read_peft_dir(d, PROFILE, **case.kwargs)
    message = str(err.value)
    assert re.search(case.expect, message), f"{case.name}: {case.expect!r} not in\n{message}"
    assert err.value.problems and err.value.path == str(d)
    assert message.startswith(f"refused adapter file {str(d)!r}: {len(err.value.problems)} problem(s)")
    assert not sentinel.exists(), "a payload ran"
    assert snapshot(tmp_path) == before, "the import changed files"


@pytest.mark.parametrize("case", WARNED, ids=[c.name for c in WARNED])
def test_code_references_are_ignored_with_a_warning(case, tmp_path):
    d, sentinel = build(case, tmp_path)
    imported = read_peft_dir(d, PROFILE)
    assert any(re.search(case.expect, w) for w in imported.warnings), imported.warnings
    assert_same_weights(imported.weights, valid_weights())
    assert not sentinel.exists() and "modeling_evil" not in sys.modules


def test_the_payloads_are_real(tmp_path):
    """Proof that the corpus is hostile: loading its pickle or importing its module does write a sentinel."""
    proof = tmp_path / "proof-pickle"
    pickle.loads(sentinel_pickle(proof))  # noqa: S301 - deliberately, on our own payload
    assert proof.exists()
    proof = tmp_path / "proof-module"
    exec(compile(sentinel_module_source(proof), "modeling_evil.py", "exec"), {})  # noqa: S102
    assert proof.exists()


def test_torch_pt_payload_is_real(tmp_path):
    import torch

    from .hostile_corpus import SentinelWriter

    proof = tmp_path / "proof-pt"
    torch.save({"x": SentinelWriter(proof)}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)  # what smoa never does
    assert proof.exists()


def test_every_problem_is_listed_in_one_error(tmp_path):
    import json

    d = tmp_path / "a"
    write_peft_dir(valid_weights(), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(r=0, use_dora=True, bias="all", target_modules=["../x"], auto_map={"A": "b.C"})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.bin").write_bytes(b"junk")
    data = bytearray((d / "adapter_model.safetensors").read_bytes())
    (d / "adapter_model.safetensors").write_bytes(bytes(data) + b"tail")
    with pytest.raises(UnsafeAdapterFileError) as err:
        read_peft_dir(d, PROFILE)
    text = "\n".join(err.value.problems)
    for needle in ("`r` must be", "`use_dora`", "`bias`", "not a module name", "trailing byte"):
        assert needle in text, needle
    assert len(err.value.problems) == 5


def test_refusal_is_a_smoa_error_and_a_value_error(tmp_path):
    with pytest.raises(SmoaError):
        read_peft_dir(tmp_path / "missing", PROFILE)
    with pytest.raises(ValueError, match="not a directory"):
        read_peft_dir(tmp_path / "missing", PROFILE)
    with pytest.raises(UnsafeAdapterFileError, match="cannot be resolved"):
        read_peft_dir(str(tmp_path) + "/\x00bad", PROFILE)


def test_valid_base_of_the_corpus_imports(tmp_path):
    from .hostile_corpus import write

    write(tmp_path / "ok")
    imported = read_peft_dir(tmp_path / "ok", PROFILE)
    assert imported.target_modules == MODULES and imported.warnings == []
    assert_same_weights(imported.weights, valid_weights())


@pytest.mark.parametrize("init", ["mica", "nora", "orthogonal"])
def test_inits_that_change_only_the_starting_factors_import_without_a_warning(init, tmp_path):
    """PEFT 0.22's MiCA and NoRA initialisations (and an unset ``astra_config``, which every 0.22 config writes) leave
    a plain LoRA forward: imported as they are, nothing to warn about. Astra's initialisation subtracts B A from the
    base weight and is refused (``config-init-astra`` in the corpus)."""
    from .hostile_corpus import valid_config, write

    write(tmp_path / "a", config={**valid_config(), "init_lora_weights": init, "astra_config": None})
    assert read_peft_dir(tmp_path / "a", PROFILE).warnings == []
