"""Config rough edges of issue 10: device, storage_path on a file, interval 0, seed range (finding 8's trigger)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smoa import ConfigError, SMoAConfig

from .helpers import open_lib


@pytest.mark.parametrize("device", ["bogus", "meta", "", "cuda:x", 3, None])
def test_bad_devices_are_refused_naming_the_field(device: object) -> None:
    with pytest.raises(ConfigError, match="`device`"):
        SMoAConfig(device=device)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_is_refused_without_cuda(device: str) -> None:
    with pytest.raises(ConfigError, match=r"`device`.*CUDA is not available"):
        SMoAConfig(device=device)


def test_cpu_device_is_canonical() -> None:
    assert SMoAConfig(device="CPU").device == "cpu"


def test_storage_path_on_a_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "a_file"
    f.write_text("not a library")
    for path in (f, f / "below"):
        with pytest.raises(ConfigError, match="`storage_path`"):
            SMoAConfig(storage_path=path)
    assert f.read_text() == "not a library"


@pytest.mark.parametrize("interval", [0, 0.0, -1, float("nan")])
def test_auto_optimize_interval_zero_is_refused(interval: float) -> None:
    with pytest.raises(ConfigError, match="`auto_optimize_interval_s`"):
        SMoAConfig(auto_optimize_interval_s=interval)


@pytest.mark.parametrize("seed", [2**80, 2**63, -1])
def test_seed_out_of_range_is_a_config_error(seed: int) -> None:
    with pytest.raises(ConfigError, match="`seed`"):
        SMoAConfig(seed=seed)
    SMoAConfig(seed=2**63 - 1)


def test_finding_8_bad_seed_leaves_nothing_locked(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    with pytest.raises(ConfigError, match="`seed`"):
        open_lib(path, seed=2**80)
    with open_lib(path) as smoa:  # not "open in another process"
        assert smoa.get_statistics()["library"]["total_adapters"] == 0


def test_finding_7_relative_storage_path_survives_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("work")
    os.mkdir("elsewhere")
    monkeypatch.chdir("work")
    with open_lib("lib", blob_inline_max_bytes=0) as smoa:  # every adapter in a weight file
        first = smoa.create_adapter_sync("domain", ["rain"], rank=4, target_modules=["model.layers.0.self_attn.v_proj"])
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert smoa.core.get_weights(first.id).rank == 4  # weights found, not "missing"
        second = smoa.create_adapter_sync("domain", ["sun"], rank=4, target_modules=["model.layers.1.self_attn.v_proj"])
    assert not (tmp_path / "elsewhere" / "lib").exists()  # nothing written relative to the new cwd
    monkeypatch.chdir(tmp_path / "work")
    with open_lib("lib") as smoa:
        assert {a.id for a in smoa.list_adapters_sync()} == {first.id, second.id}
        assert smoa.core.get_weights(second.id).rank == 4
