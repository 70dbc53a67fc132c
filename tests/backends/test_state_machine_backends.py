"""The core's model-based test (tests/core/test_state_machine.py) on PostgreSQL + S3 and on PostgreSQL alone.

Same rules, same oracle, same invariants as on SQLite; only where the library lives changes: a fresh database (and
bucket) per example. Bounded in the default run (``SMOA_BACKEND_STATEFUL_EXAMPLES``, 8); ``-m slow`` runs 150.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.core` as a (namespace) package

from tests.core import conftest as core_conftest
from tests.core.test_state_machine import ENCODERS, CoreMachine, Oracle

EXAMPLES = int(os.environ.get("SMOA_BACKEND_STATEFUL_EXAMPLES", "8"))
_SETTINGS: dict[str, Any] = {"deadline": None, "suppress_health_check": list(HealthCheck), "derandomize": True,
                              "stateful_step_count": 8}


class BackendMachine(CoreMachine):
    """CoreMachine on a shared backend: ``services`` is set by the test to (pg_server, s3_server or None)."""

    services: tuple[Any, Any] = (None, None)

    def __init__(self) -> None:  # CoreMachine.__init__ opens a directory library; this opens the backend
        RuleBasedStateMachine.__init__(self)
        pg, s3 = self.services
        self.tmp = tempfile.TemporaryDirectory(prefix="smoa-sm-")
        self.path = Path(self.tmp.name)
        self.url = pg.create_database()
        self.weights_url = f"s3://{s3.create_bucket()}/sm" if s3 is not None else None
        self.encoder = "hash"
        self.core = self._open()
        self.oracle = Oracle()
        self.seed = 1000

    def _open(self) -> Any:
        extra = {"weights_cache_path": str(self.path / "tier")} if self.weights_url else {}
        return core_conftest.open_core(self.url, weights_path=self.weights_url, encoder=self.encoder,  # type: ignore[arg-type]
                                       blob_inline_max_bytes=700, extra=extra)  # fmt: skip

    @rule()
    def reopen(self) -> None:
        self.core.close()
        self.core = self._open()

    @rule()
    def reopen_with_another_encoder(self) -> None:
        self.core.close()
        self.encoder = ENCODERS[1 - ENCODERS.index(self.encoder)]
        self.core = self._open()
        assert self.core.reencoded == self.core.catalog.count(("active", "archived", "merged"))


@pytest.mark.parametrize("examples", [EXAMPLES, pytest.param(150, marks=pytest.mark.slow)])
def test_model_based_on_postgres_and_s3(pg_server: Any, s3_server: Any, examples: int) -> None:
    BackendMachine.services = (pg_server, s3_server)
    run_state_machine_as_test(BackendMachine, settings=settings(max_examples=examples, **_SETTINGS))


@pytest.mark.parametrize("examples", [max(4, EXAMPLES // 3), pytest.param(100, marks=pytest.mark.slow)])
def test_model_based_on_postgres_alone(pg_server: Any, examples: int) -> None:
    """No object store: the weights are ``bytea`` rows of the same database."""
    BackendMachine.services = (pg_server, None)
    run_state_machine_as_test(BackendMachine, settings=settings(max_examples=examples, **_SETTINGS))
