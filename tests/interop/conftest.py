"""Fixtures of the interop tests."""

from __future__ import annotations

import pytest

from smoa.adapter.profile import BaseProfile

from .helpers import tiny_profile


@pytest.fixture()
def profile() -> BaseProfile:
    return tiny_profile()
