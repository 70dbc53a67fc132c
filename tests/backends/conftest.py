"""Real PostgreSQL and S3 (moto server mode) for the backend tests, and the backend parametrisation.

A session starts one PostgreSQL cluster (Debian's package: ``initdb`` + ``pg_ctl`` in a temporary directory as the
unprivileged ``postgres`` user, on a free port) and one moto S3 server on 127.0.0.1; each test gets its own
database and bucket. When a service cannot be installed or started, the tests that need it fail loudly under
``CI=true`` and are skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import local_services

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not available here: {exc}"
    if _IN_CI:
        pytest.fail(f"{message} (CI=true: the backend tests must run in CI)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[local_services.LocalPostgres]:
    """One PostgreSQL cluster for the session (``.restart()`` for the restart tests)."""
    try:
        import psycopg  # noqa: F401

        server = local_services.LocalPostgres().start()
    except (local_services.ServiceUnavailable, ImportError) as exc:
        _unavailable("PostgreSQL", exc)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[local_services.LocalS3]:
    """moto's S3 server on 127.0.0.1 for the session; sets the standard AWS_* variables (children inherit)."""
    try:
        import boto3  # noqa: F401

        server = local_services.LocalS3().start()
    except (local_services.ServiceUnavailable, ImportError, OSError) as exc:
        _unavailable("moto S3 server", exc)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def pg_url(pg_server: local_services.LocalPostgres) -> str:
    """A fresh, empty database: ``postgresql://smoa@127.0.0.1:PORT/t_xxx``."""
    return pg_server.create_database()


@pytest.fixture()
def s3_url(s3_server: local_services.LocalS3) -> str:
    """A fresh bucket: ``s3://smoa-xxx/lib``."""
    return f"s3://{s3_server.create_bucket()}/lib"


BACKENDS = ["sqlite", "postgres+s3"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """``SMoAConfig`` storage fields of one backend: a local directory, or PostgreSQL + S3.

    Returns ``{"storage_path": ..., "weights_path": ...}`` (``weights_path`` None for SQLite).
    """
    if request.param == "sqlite":
        return {"storage_path": str(tmp_path / "lib"), "weights_path": None, "name": "sqlite"}
    pg = request.getfixturevalue("pg_url")
    s3 = request.getfixturevalue("s3_url")
    return {"storage_path": pg, "weights_path": s3, "name": "postgres+s3", "cache_dir": str(tmp_path / "s3cache")}

