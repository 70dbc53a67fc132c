from __future__ import annotations

import pytest

from smoa import ConfigError, RoutingStrategy, SMoAConfig, create_sparse_adapter_mixture
from smoa.config import AdapterGranularity


def test_defaults_and_string_enums() -> None:
    cfg = SMoAConfig(routing_strategy="task_based")
    assert cfg.routing_strategy is RoutingStrategy.TASK_BASED
    assert SMoAConfig(routing_strategy="HIERARCHICAL").routing_strategy is RoutingStrategy.HIERARCHICAL
    assert SMoAConfig().routing_strategy is RoutingStrategy.HYBRID


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_adapters": 0}, "max_adapters"),
        ({"max_adapters": "10"}, "max_adapters"),
        ({"max_active_adapters": True}, "max_active_adapters"),
        ({"routing_threshold": 2.0}, "routing_threshold"),
        ({"routing_threshold": float("nan")}, "routing_threshold"),
        ({"routing_strategy": "random"}, "routing_strategy"),
        ({"lazy_loading": "yes"}, "lazy_loading"),
        ({"prune_action": "burn"}, "prune_action"),
        ({"storage_path": ""}, "storage_path"),
        ({"adapter_dtype": "int8"}, "adapter_dtype"),
    ],
)
def test_bad_values_name_field_and_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        SMoAConfig(**kwargs)
    msg = str(info.value)
    assert f"`{field}`" in msg
    assert repr(next(iter(kwargs.values()))) in msg


def test_unknown_field_is_refused_everywhere() -> None:
    with pytest.raises(ConfigError, match="`max_adaptors`=5"):
        SMoAConfig(max_adaptors=5)
    with pytest.raises(ConfigError, match="`colour`='red'"):
        create_sparse_adapter_mixture(colour="red")


def test_granularity_ranges_are_contiguous() -> None:
    ranges = [g.param_range for g in AdapterGranularity]
    assert ranges[0] == (1_000, 10_000)
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert lo == hi + 1
