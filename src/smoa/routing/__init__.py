"""Routing: which adapters serve a query (encoders, indexes, strategies, router)."""

from __future__ import annotations

from smoa.routing.route import Route

__all__ = ["Route", "Router", "RoutingText"]


def __getattr__(name: str) -> object:  # lazy: importing smoa.routing must not pull faiss or torch
    if name in ("Router", "RoutingText"):
        from smoa.routing import router

        return getattr(router, name)
    raise AttributeError(f"module 'smoa.routing' has no attribute {name!r}")
