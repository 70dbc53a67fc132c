"""Composition: merging adapters' updates, their similarity, composite adapters and learned weights."""

from __future__ import annotations

from smoa.compose.composite import check_members, dependents, flatten, materialise, would_cycle
from smoa.compose.learned import LearnedComposition, compose_from_examples, search_weights
from smoa.compose.merge import METHODS, MethodInfo, combine, combine_mean, factored_norm, merge_error
from smoa.compose.similarity import (
    LoraStack,
    batched_cosine,
    batched_inner,
    cosine,
    inner,
    norm,
    sketch,
    sketch_batch,
    stack_weights,
)

__all__ = [
    "METHODS",
    "LearnedComposition",
    "LoraStack",
    "MethodInfo",
    "batched_cosine",
    "batched_inner",
    "check_members",
    "combine",
    "combine_mean",
    "compose_from_examples",
    "cosine",
    "dependents",
    "factored_norm",
    "flatten",
    "inner",
    "materialise",
    "merge_error",
    "norm",
    "search_weights",
    "sketch",
    "sketch_batch",
    "stack_weights",
    "would_cycle",
]
