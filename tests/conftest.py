from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The S3 weight store's default local tier is $XDG_CACHE_HOME/smoa/s3: keep the tests' buckets out of the user's cache.
_CACHE_HOME = tempfile.mkdtemp(prefix="smoa-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, True)

# Shared test helpers (e.g. `reliability.helpers`) importable from any test package, under `pytest` and `python -m pytest`.
sys.path.insert(0, str(Path(__file__).parent))
