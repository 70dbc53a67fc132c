"""`smoa serve`: an OpenAI- and LoRAX-compatible HTTP server where every request gets its own adapter mixture.

Layers (one concern per file)::

    protocol.py    pydantic request models (OpenAI / LoRAX schemas, limits)
    serving.py     SmoaServing: the logic — tokenize, select adapters, submit, shape responses (no HTTP types)
    scheduler.py   continuous batching at the decode step, each row its own mixture
    api_router.py  thin FastAPI routers;  app.py: build_app(config), lifespan, errors, body cap
    auth.py        API keys (constant-time);  metrics.py: Prometheus;  cli.py: `smoa serve`

Start it with ``smoa serve --library PATH`` or, in Python, ``uvicorn.run(build_app(ServeConfig(library=...)))``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_app": "smoa.serve.app",
    "ServeConfig": "smoa.serve.config",
    "SamplingParams": "smoa.serve.scheduler",
    "Scheduler": "smoa.serve.scheduler",
    "Sequence": "smoa.serve.scheduler",
    "SequenceState": "smoa.serve.scheduler",
    "SmoaServing": "smoa.serve.serving",
}

__all__ = ["SamplingParams", "Scheduler", "Sequence", "SequenceState", "ServeConfig", "SmoaServing", "build_app"]


def __getattr__(name: str) -> Any:
    """Import lazily: `smoa --help` and the other CLI commands do not pay for FastAPI."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'smoa.serve' has no attribute {name!r}")
