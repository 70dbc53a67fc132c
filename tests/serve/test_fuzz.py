"""The OpenAPI schema fuzzed with schemathesis for a bounded number of examples per operation: no 5xx, no crash,
no hang (every call has a timeout), and the server still healthy at the end."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from smoa.serve import ServeConfig, build_app

from .helpers import ThreadServer, make_library

KEY = "sk-fuzz"
# the schema is static: take it from an app that loads nothing (schemathesis' pytest plugin does not support
# pytest 9 fixtures, so operations are parametrised here and each one is driven by its hypothesis strategy)
SCHEMA = schemathesis.openapi.from_dict(build_app(ServeConfig(library="unused"), load=False).openapi())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, model_dir):
    lib = tmp_path_factory.mktemp("fuzz") / "lib"
    make_library(lib, model_dir, 3)
    cfg = ServeConfig(library=lib, model_dir=model_dir, encoder="hash", admin_keys=(KEY,), max_tokens_cap=8,
                      max_n=2, max_body_bytes=32 * 1024, max_upload_bytes=256 * 1024, max_queue=64)  # fmt: skip
    with ThreadServer(cfg) as srv:
        yield srv


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_server_errors(label: str, fuzz_server) -> None:
    op = OPERATIONS[label]

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy())
    def check(case) -> None:
        response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
        ctype = response.headers.get("content-type") or ""
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        if response.status_code >= 400 and ctype.startswith("application/json"):
            body = response.json()
            err = body.get("error") if isinstance(body, dict) else None
            assert isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}, body

    check()


def test_still_healthy_after_fuzzing(fuzz_server) -> None:
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    assert fuzz_server.serving.scheduler.error is None
