"""Fixtures of the server tests: one tiny model directory, one library, one real uvicorn server with keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smoa.serve import ServeConfig

from .helpers import ThreadServer, make_library, save_tiny_model

USER_KEY = "sk-user-1"
OTHER_KEY = "sk-user-2"
ADMIN_KEY = "sk-admin-1"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, list[tuple[str, Any]]]:
    path = tmp_path_factory.mktemp("lib") / "library"
    return path, make_library(path, model_dir, 8)


@pytest.fixture(scope="module")
def server(library: tuple[Path, list[tuple[str, Any]]], model_dir: Path) -> Iterator[ThreadServer]:
    cfg = ServeConfig(library=library[0], model_dir=model_dir, encoder="hash", api_keys=(USER_KEY, OTHER_KEY),
                      admin_keys=(ADMIN_KEY,), max_tokens_cap=64, max_n=4, max_body_bytes=64 * 1024,
                      max_upload_bytes=4 * 1024 * 1024)  # fmt: skip
    with ThreadServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def adapter_ids(library: tuple[Path, list[tuple[str, Any]]]) -> list[str]:
    return [a for a, _ in library[1]]
