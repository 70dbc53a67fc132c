from __future__ import annotations

import json

from smoa import AdapterSpecialization, SMoAConfig, SparseAdapterMixture
from smoa.cli import COMMANDS, build_parser, main


def test_every_command_is_in_the_one_table() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(c.name for c in COMMANDS)


def test_stats_and_route_on_a_persistent_library(tmp_path, capsys) -> None:
    path = tmp_path / "lib"
    with SparseAdapterMixture(SMoAConfig(storage_path=path)) as smoa:
        ad = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["volcanology"], ["eruptions"])
    assert main(["stats", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["library"]["total_adapters"] == 1
    assert main(["route", str(path), "lava eruptions", "--meta", "domain=volcanology", "-k", "1"]) == 0
    assert ad.id in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys) -> None:
    path = tmp_path / "lib"
    SparseAdapterMixture(SMoAConfig(storage_path=path)).close()
    assert main(["export-peft", str(path), "ad_missing", str(tmp_path / "out")]) == 2
    assert "ad_missing" in capsys.readouterr().err
