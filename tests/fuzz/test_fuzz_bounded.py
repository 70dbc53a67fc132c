"""Run the atheris import fuzzer for a bounded time (``SMOA_FUZZ_SECONDS``, default 20) and require no finding."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).with_name("fuzz_import.py")
SECONDS = int(os.environ.get("SMOA_FUZZ_SECONDS", "20"))


def test_import_fuzzer_finds_no_crash(tmp_path):
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(TARGET), "--seed-corpus", str(corpus)], check=True, env=env, timeout=120)
    run = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=4096",
            "-max_len=8192",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=SECONDS + 180,
        cwd=tmp_path,
    )
    log = run.stdout + run.stderr
    findings = sorted(p.name for p in artifacts.iterdir())
    assert run.returncode == 0 and not findings, f"fuzzer finding(s) {findings}:\n{log[-4000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert done and int(done.group(1)) > 1000, log[-2000:]
    print(f"atheris: {done.group(1)} inputs in {done.group(2)} s, corpus {len(list(corpus.iterdir()))} files")
