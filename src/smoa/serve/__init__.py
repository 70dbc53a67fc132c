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

from smoa.serve.app import build_app
from smoa.serve.config import ServeConfig
from smoa.serve.scheduler import SamplingParams, Scheduler, Sequence, SequenceState
from smoa.serve.serving import SmoaServing

__all__ = ["SamplingParams", "Scheduler", "Sequence", "SequenceState", "ServeConfig", "SmoaServing", "build_app"]
