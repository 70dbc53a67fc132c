"""PEFT import / export and the strict checks applied to untrusted adapter files.

Names are resolved lazily (PEP 562), so importing :mod:`smoa.interop.safetensors_check` (a re-export of
:mod:`smoa.adapter.safetensors_io`) does not import :mod:`smoa.interop.peft`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ImportedAdapter": "smoa.interop.peft",
    "peft_config_dict": "smoa.interop.peft",
    "peft_state_dict": "smoa.interop.peft",
    "read_peft_bytes": "smoa.interop.peft",
    "read_peft_dir": "smoa.interop.peft",
    "write_peft_dir": "smoa.interop.peft",
    "PeftLoraSettings": "smoa.interop.peft_config",
    "parse_peft_config": "smoa.interop.peft_config",
    "DEFAULT_MAX_HEADER_BYTES": "smoa.interop.safetensors_check",
    "SafetensorsHeader": "smoa.interop.safetensors_check",
    "check_safetensors_bytes": "smoa.interop.safetensors_check",
    "check_stored_bytes": "smoa.interop.safetensors_check",
    "inspect_safetensors_bytes": "smoa.interop.safetensors_check",
    "load_safetensors_bytes": "smoa.interop.safetensors_check",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from smoa.interop.peft import (
        ImportedAdapter,
        peft_config_dict,
        peft_state_dict,
        read_peft_bytes,
        read_peft_dir,
        write_peft_dir,
    )
    from smoa.interop.peft_config import PeftLoraSettings, parse_peft_config
    from smoa.interop.safetensors_check import (
        DEFAULT_MAX_HEADER_BYTES,
        SafetensorsHeader,
        check_safetensors_bytes,
        check_stored_bytes,
        inspect_safetensors_bytes,
        load_safetensors_bytes,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smoa.interop' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
