"""The `smoa` command line: the full set of commands; a path without a library is refused (finding 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoa.adapter.weights import LoraWeights
from smoa.cli import COMMANDS, build_parser, main
from smoa.interop.peft import write_peft_dir

from .helpers import open_lib

V0 = "model.layers.0.self_attn.v_proj"
SMOA = [sys.executable, "-m", "smoa.cli"]


def run_smoa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point (``smoa`` script) in a subprocess."""
    exe = Path(sys.executable).parent / "smoa"
    cmd = [str(exe), *args] if exe.exists() else [*SMOA, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


@pytest.fixture
def lib(tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "lib"
    with open_lib(path) as smoa:
        ids = [smoa.create_adapter_sync("domain", [t], ["answer"]).id for t in ("volcanology", "medical", "finance")]
    return path, ids


@pytest.mark.parametrize("command", ["stats", "route", "optimize", "list", "compact", "fsck", "show", "delete"])
def test_finding_13_a_path_without_a_library_is_refused(tmp_path: Path, command: str, capsys) -> None:
    missing = tmp_path / "nothing-here"
    extra = {"route": ["a query"], "show": ["ad_0000000000000000"], "delete": ["ad_0000000000000000"]}.get(command, [])
    assert main([command, str(missing), *extra]) == 2
    assert "no smoa library" in capsys.readouterr().err
    assert not missing.exists()
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert main([command, str(empty), *extra]) == 2
    assert list(empty.iterdir()) == []


def test_finding_13_via_the_console_script_and_version(tmp_path: Path) -> None:
    done = run_smoa("stats", str(tmp_path / "x"))
    assert done.returncode != 0 and "no smoa library" in done.stderr
    assert list(tmp_path.iterdir()) == []
    done = run_smoa("--version")
    assert done.returncode == 0 and done.stdout.startswith("smoa ")


def _help(name: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name].format_help()


def test_help_documents_positionals() -> None:
    for name in ("stats", "list", "show", "route", "import", "export", "delete", "archive", "restore", "compact",
                 "optimize", "fsck"):  # fmt: skip
        text = _help(name)
        assert "LIBRARY" in text and "library directory" in text, name
    assert "QUERY" in _help("route") and "the query text" in _help("route")
    assert "ADAPTER_ID" in _help("delete") and "DIRECTORY" in _help("import") and "PEFT" in _help("import")
    assert "--encoder" in _help("route") and "--encoder" in _help("stats") and "--repair" in _help("fsck")


def test_the_full_set_is_in_the_one_table() -> None:
    names = {c.name for c in COMMANDS}
    assert {"run", "stats", "route", "list", "show", "import", "export", "delete", "archive", "restore", "compact",
            "optimize", "fsck"} <= names  # fmt: skip
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(names)


def test_list_show_archive_restore_delete_compact(lib, capsys) -> None:
    path, ids = lib
    assert main(["list", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids)
    assert main(["list", str(path), "--tag", "ＭＥＤＩＣＡＬ", "--json"]) == 0
    assert [a["id"] for a in json.loads(capsys.readouterr().out)] == [ids[1]]
    assert main(["show", str(path), ids[0]]) == 0
    assert json.loads(capsys.readouterr().out)["domain_tags"] == ["volcanology"]
    assert main(["archive", str(path), ids[0]]) == 0
    capsys.readouterr()
    assert main(["list", str(path), "--status", "archived"]) == 0
    assert ids[0] in capsys.readouterr().out
    assert main(["restore", str(path), ids[0]]) == 0
    assert "active" in capsys.readouterr().out
    assert main(["delete", str(path), ids[1], ids[2]]) == 0
    assert main(["compact", str(path)]) == 0
    assert "bytes reclaimed" in capsys.readouterr().out
    assert main(["list", str(path), "--json"]) == 0
    assert [a["id"] for a in json.loads(capsys.readouterr().out)] == [ids[0]]
    assert main(["show", str(path), ids[1]]) == 2  # deleted: a clear error, exit 2
    assert ids[1] in capsys.readouterr().err


def test_import_export_round_trip(lib, tmp_path: Path, capsys) -> None:
    path, _ = lib
    from smoa.adapter.profile import default_profile

    d_in, d_out = default_profile().shape(V0)
    g = torch.Generator().manual_seed(1)
    w = LoraWeights({V0: (torch.randn(4, d_in, generator=g) * 0.1, torch.randn(d_out, 4, generator=g) * 0.1)}, 8.0, 4)
    write_peft_dir(w, tmp_path / "peft")
    assert main(["import", str(path), str(tmp_path / "peft"), "--domain", "geology", "--skill", "rocks"]) == 0
    new_id = capsys.readouterr().out.strip()
    assert main(["export", str(path), new_id, str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert main(["route", str(path), "rocks", "--meta", "domain=geology", "-k", "1", "--strategy", "task_based"]) == 0
    assert new_id in capsys.readouterr().out


def test_stats_uses_the_recorded_encoder(tmp_path: Path, capsys) -> None:
    path = tmp_path / "lib"
    with open_lib(path, encoder="static") as smoa:
        smoa.create_adapter_sync("domain", ["medical"])
    assert main(["stats", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert "static" in json.dumps(stats)


def test_fsck_command(lib, capsys) -> None:
    path, _ = lib
    assert main(["fsck", str(path)]) == 0
    assert "catalog ok" in capsys.readouterr().out
    assert main(["fsck", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clean"] is True
    (path / "catalog.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (path / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    assert main(["fsck", str(path)]) == 2  # no catalog and (inline blobs) no weight files: nothing to check


def test_run_still_passes_its_arguments_through(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0 and "--distractors" in capsys.readouterr().out
