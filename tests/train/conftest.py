from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from .helpers import tiny_llama, word_tokenizer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run on one thread: with two threads on a busy 2-core machine, OpenMP waits dominate (~300x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()
