"""`smoa serve --ray --replicas N` in a subprocess: it starts a local Ray, serves the API, and stops on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .fixtures import build_library, tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_smoa_serve_ray_serves_and_stops(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path)
    ids = build_library(tmp_path / "lib", model_dir, topics=("astronomy", "baking"))
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "smoa.cli", "serve", "--library", str(tmp_path / "lib"),
                             "--model", str(model_dir), "--encoder", "hash", "--ray", "--replicas", "2",
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(url + "/v1/completions", json={"model": ids[0], "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.headers["x-smoa-replica"], r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_replicas_must_be_positive() -> None:
    from smoa.errors import ConfigError
    from smoa.serve.ray import RayOptions

    with pytest.raises(ConfigError, match="`replicas`"):
        RayOptions(replicas=0)


def test_snapshots_of_replicas_that_are_gone_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica killed outright leaves its library copy behind; the next snapshot on the machine removes it."""
    import tempfile

    from smoa.serve import ray as smoa_ray

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"smoa-replica-{gone.pid}-x1y2z3"
    (dead / "library").mkdir(parents=True)
    (dead / "library" / "catalog.db").write_bytes(b"x" * 100)
    alive = tmp_path / f"smoa-replica-{os.getpid()}-a1b2c3"
    (alive / "library").mkdir(parents=True)
    unnamed = tmp_path / "smoa-replica-12345678"  # no process id in the name: not ours to judge
    unnamed.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    (source / "catalog.db").write_text("catalog")
    (source / "LOCK").write_text("held")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    copy = Path(smoa_ray._snapshot(str(source)))

    assert not dead.exists() and alive.is_dir() and unnamed.is_dir()
    assert copy.parent.parent == tmp_path and copy.parent.name.startswith(f"smoa-replica-{os.getpid()}-")
    assert (copy / "catalog.db").read_text() == "catalog" and not (copy / "LOCK").exists()
    assert smoa_ray.sweep_snapshots(tmp_path) == []  # this process runs: its copies stay
