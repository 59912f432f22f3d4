"""Server-side strategies, selected by name with ``--strategy``."""

from __future__ import annotations

from typing import Any

from coordinator.strategies.base import ClientUpdate, Strategy
from coordinator.strategies.fedavg import FedAvg
from fedmq.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {FedAvg.name: FedAvg}


def load_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as ``name`` with keyword ``options``."""
    try:
        strategy_class = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy must be one of {sorted(STRATEGIES)}, but got {name!r}") from None
    try:
        return strategy_class(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options for strategy {name!r}: {exc}") from exc


__all__ = ["STRATEGIES", "ClientUpdate", "FedAvg", "Strategy", "load_strategy"]
