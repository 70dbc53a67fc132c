"""Compatibility re-export: the strict safetensors reader now lives in :mod:`smoa.adapter.safetensors_io`.

``adapter/`` must not import upward from ``interop/`` (issue 10), so the reader moved down; this module keeps the
old import path working for user code and tests.
"""

from __future__ import annotations

from smoa.adapter.safetensors_io import (
    DEFAULT_MAX_HEADER_BYTES,
    DTYPE_SIZES,
    MAX_TENSOR_DIMS,
    SafetensorsHeader,
    TensorEntry,
    check_safetensors_bytes,
    check_stored_bytes,
    inspect_safetensors_bytes,
    load_safetensors_bytes,
    refuse,
    strict_json_loads,
)

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES", "DTYPE_SIZES", "MAX_TENSOR_DIMS", "SafetensorsHeader", "TensorEntry",
    "check_safetensors_bytes", "check_stored_bytes", "inspect_safetensors_bytes", "load_safetensors_bytes", "refuse",
    "strict_json_loads",
]  # fmt: skip
