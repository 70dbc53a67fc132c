"""A loaded server moves its objects out of Python's full garbage collections (``ServeConfig.freeze_gc``)."""

from __future__ import annotations

import argparse
import gc

import pytest

from smoa.errors import ConfigError
from smoa.serve import ServeConfig

from .helpers import make_library


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in a generation the collector walks (frozen objects are in none of them)."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.parametrize("freeze", [True, False])
def test_loaded_objects_frozen_until_close(tmp_path, model_dir, freeze) -> None:
    from smoa.serve import SmoaServing
    from smoa.serve.protocol import RouteRequest

    lib = tmp_path / "lib"
    make_library(lib, model_dir, 2)
    serving = SmoaServing(ServeConfig(library=lib, model_dir=model_dir, encoder="hash", freeze_gc=freeze))
    before = gc.get_freeze_count()
    serving.load()
    try:
        library = serving.smoa
        if freeze:
            # the model, the library and everything imported: out of reach of a full collection
            assert gc.get_freeze_count() > before + 10_000
            assert not _tracked(library) and not _tracked(serving.engine)
        else:
            assert gc.get_freeze_count() == before
            assert _tracked(library)
        assert serving.route(RouteRequest(query="a question about medicine"))["adapter_ids"]  # still serves
    finally:
        serving.close()
    # closed: collectable again
    assert gc.get_freeze_count() == (0 if freeze else before)
    assert _tracked(library)


def test_freeze_gc_flag_and_bad_value() -> None:
    from smoa.serve.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args(["--library", "x"])).freeze_gc is True
    assert config_from_args(p.parse_args(["--library", "x", "--no-freeze-gc"])).freeze_gc is False
    with pytest.raises(ConfigError, match="freeze_gc.*'yes'"):
        ServeConfig(library="x", freeze_gc="yes")
