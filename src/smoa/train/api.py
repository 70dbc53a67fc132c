"""``train_adapter``: train one library adapter on text, store it, and re-key it for routing (continual learning).

::

    adapter_or_spec ──(a spec: create it)──► adapter id ──► core.get_weights
                                                                   │
                                  train_adapter_weights (frozen base) ──► core.update_weights
                                                                          (new version, caches dropped)
    routing texts += its training inputs as examples ──► core.update_adapter (key re-encoded, routes follow)

Nothing else changes: other adapters' weights, keys and versions and the base model's parameters are left
bit for bit as they were (tested), so adapters can be added and trained one after another without forgetting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smoa.adapter.spec import Adapter, AdapterSpec
from smoa.errors import CompositionError, InvalidInputError
from smoa.train.loop import TrainHistory, train_adapter_weights

if TYPE_CHECKING:
    from smoa.mixture import SparseAdapterMixture

MAX_ROUTING_EXAMPLES = 256


@dataclass
class TrainResult:
    """What :func:`train_adapter` did.

    Attributes:
        adapter: the adapter after training (new ``version``).
        history: the loop's losses, learning rates and timings.
        created: whether the adapter was created from a spec by this call.
        routing_examples: how many training inputs its routing key was computed from.
    """

    adapter: Adapter
    history: TrainHistory
    created: bool
    routing_examples: int


def routing_examples(data: Sequence[Any], limit: int = MAX_ROUTING_EXAMPLES) -> list[str]:
    """The texts a trained adapter is routed by: each text item, or the input of each ``(input, target)`` pair,
    at most ``limit`` of them spread evenly over the data (token-id items are skipped)."""
    texts = []
    for item in data:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            texts.append(item[0])
    if len(texts) <= limit:
        return texts
    step = len(texts) / limit
    return [texts[int(i * step)] for i in range(limit)]


def _resolve_adapter(smoa: SparseAdapterMixture, adapter_or_spec: Any) -> tuple[Adapter, bool]:
    if isinstance(adapter_or_spec, (AdapterSpec, Mapping)):
        return smoa.core.create_many([adapter_or_spec])[0], True
    if isinstance(adapter_or_spec, Adapter):
        return smoa.core.get_adapter(adapter_or_spec.id), False
    if isinstance(adapter_or_spec, str):
        return smoa.core.get_adapter(adapter_or_spec), False
    raise InvalidInputError(
        f"`adapter_or_spec` must be an adapter id, an Adapter, an AdapterSpec or a mapping, got "
        f"{type(adapter_or_spec).__name__}"
    )


def train_adapter(
    smoa: SparseAdapterMixture,
    adapter_or_spec: str | Adapter | AdapterSpec | Mapping[str, Any],
    data: Sequence[Any],
    steps: int = 100,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int = 128,
    progress: bool = True,
    *,
    update_routing_key: bool = True,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    grad_clip: float | None = 1.0,
) -> TrainResult:
    """Train an adapter of ``smoa``'s library on ``data`` with the attached base model frozen.

    Args:
        smoa: a :class:`~smoa.mixture.SparseAdapterMixture` with a base model attached.
        adapter_or_spec: an existing adapter (id or :class:`Adapter`), or a spec (:class:`AdapterSpec` or a
            mapping of its fields) for a new adapter, created first (fresh factors: A random, B zero).
        data: texts, or ``(input, target)`` pairs (loss on the target only); see :mod:`smoa.train.loop`.
        steps, lr, batch_size, seed, max_length, progress: as in :func:`~smoa.train.loop.train_adapter_weights`.
        update_routing_key: store (a spread of) the training inputs as the adapter's routing examples and re-key
            it from its tags, description and those examples.
        weight_decay, warmup, grad_clip: as in :func:`~smoa.train.loop.train_adapter_weights`.

    Returns:
        A :class:`TrainResult`. On any error during training nothing is stored (a freshly created adapter stays,
        untrained, in the library).

    Raises:
        InvalidInputError: bad arguments or data; no base model attached.
        CompositionError: the adapter is COMPOSITE (train its members instead).
    """
    engine = smoa.engine  # raises InvalidInputError when no model is attached
    adapter, created = _resolve_adapter(smoa, adapter_or_spec)
    if adapter.is_composite:
        raise CompositionError(f"adapter {adapter.id!r} is COMPOSITE; train its members instead")
    core = smoa.core
    start = core.get_weights(adapter.id)
    loop_kwargs: dict[str, Any] = {"weight_decay": weight_decay, "warmup": warmup}
    if grad_clip is not None:
        loop_kwargs["grad_clip"] = grad_clip
    with smoa.engine_lock:
        trained, history = train_adapter_weights(
            engine, start, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length,
            progress=progress, description=f"training {adapter.id}", **loop_kwargs,
        )  # fmt: skip
    adapter = core.update_weights(adapter.id, trained)
    examples = routing_examples(data) if update_routing_key else []
    if examples:
        adapter = core.update_adapter(adapter.id, examples=examples)
    return TrainResult(core.get_adapter(adapter.id), history, created, len(examples))


__all__ = ["TrainResult", "routing_examples", "train_adapter"]
