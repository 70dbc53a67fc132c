"""`ServeConfig`: everything `smoa serve` (and :func:`smoa.serve.build_app`) is started with, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoa.errors import ConfigError

__all__ = ["ServeConfig", "keys_from_env"]

_POSITIVE = ("max_batch", "max_queue", "max_tokens_cap", "max_n", "max_body_bytes", "max_upload_bytes",
             "max_batch_tokens", "prefill_tokens", "max_page_size", "merge_cache_size")  # fmt: skip


@dataclass
class ServeConfig:
    """How the server runs.

    Attributes:
        library: the library directory (``storage_path``).
        create: create a new library there if none exists (else refused).
        model_dir: an HF model directory (model + tokenizer); ``None`` = the embedded SmolLM2-135M-Instruct.
        model_name: the served base-model name (default: the directory's name, or ``SmolLM2-135M-Instruct``).
        host, port: where uvicorn listens.
        api_keys: inference keys (``Authorization: Bearer KEY``); empty = no key needed.
        admin_keys: management keys (also valid for inference); empty = management needs no key when
            ``api_keys`` is empty too, else it is refused (403).
        max_batch: running sequences at most (rows of one decode step).
        max_queue: waiting sequences at most (then 429).
        max_batch_tokens: token budget of the running batch (prompt + max_tokens, summed).
        prefill_tokens: prompt tokens prefilled between two decode steps.
        per_client_cap: running sequences per API key at most (0 = ``max(1, max_batch // 2)``).
        max_tokens_cap: largest ``max_tokens`` / ``max_new_tokens`` accepted.
        max_n: largest ``n``.
        max_body_bytes: JSON body cap (413 above, checked before the body is read whole).
        max_upload_bytes: multipart upload cap (413 above).
        max_page_size: largest ``limit`` of paginated lists.
        merge_cache_size: LoRAX merged adapters (non-linear strategies) kept merged.
        dtype: model dtype ("float32", "float16", "bfloat16", "float64").
        device: model device (default: the library config's device).
        encoder: routing encoder (``None``: the library's default).
        smoa_overrides: extra :class:`~smoa.SMoAConfig` fields for the library.
        drain_timeout_s: how long SIGTERM waits for in-flight requests.
        freeze_gc: once loaded, move every live object into the garbage collector's permanent generation
            (``gc.freeze``), so that Python's full collections no longer walk the ~460K objects of torch, the model
            and the library (stalls of up to ~290 ms; ``benchmarks/bench_gc.py``); undone when the server closes.
    """

    library: str | Path = ""
    create: bool = False
    model_dir: str | Path | None = None
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    max_batch: int = 16
    max_queue: int = 256
    max_batch_tokens: int = 65536
    prefill_tokens: int = 4096
    per_client_cap: int = 0
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024
    max_page_size: int = 1000
    merge_cache_size: int = 32
    dtype: str = "float32"
    device: str | None = None
    encoder: str | None = None
    smoa_overrides: dict[str, Any] = field(default_factory=dict)
    drain_timeout_s: float = 30.0
    freeze_gc: bool = True

    def __post_init__(self) -> None:
        if not str(self.library):
            raise ConfigError("`library` must name a library directory, got ''")
        if "://" not in str(self.library):  # a database URL (postgresql://...) stays a string
            self.library = Path(self.library)
        if self.model_dir is not None:
            self.model_dir = Path(self.model_dir)
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{name}` must be a positive int, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"`port` must be in 0..65535, got {self.port!r}")
        if self.per_client_cap < 0:
            raise ConfigError(f"`per_client_cap` must be >= 0, got {self.per_client_cap!r}")
        if not isinstance(self.freeze_gc, bool):
            raise ConfigError(f"`freeze_gc` must be a bool, got {self.freeze_gc!r}")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ConfigError(f"`dtype` must be float32, float16, bfloat16 or float64, got {self.dtype!r}")
        self.api_keys = _clean_keys(self.api_keys, "api_keys")
        self.admin_keys = _clean_keys(self.admin_keys, "admin_keys")

    @property
    def client_cap(self) -> int:
        return self.per_client_cap or max(1, self.max_batch // 2)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)


def _clean_keys(keys: Any, name: str) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = keys.split(",")
    out = tuple(k.strip() for k in keys if isinstance(k, str) and k.strip())
    if len(out) != len([k for k in keys if str(k).strip()]):
        raise ConfigError(f"`{name}` must be strings, got {keys!r}")
    return out


def keys_from_env(cli_value: str | None, env_name: str) -> tuple[str, ...]:
    """Keys from a CLI flag (comma-separated), else from the environment variable ``env_name``."""
    raw = cli_value if cli_value else os.environ.get(env_name, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())
