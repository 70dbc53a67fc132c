from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shared test helpers (e.g. `reliability.helpers`) importable from any test package, under `pytest` and `python -m pytest`.
sys.path.insert(0, str(Path(__file__).parent))
