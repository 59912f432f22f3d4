"""Server-side strategies, selected by name with ``--strategy``."""

from __future__ import annotations

from typing import Any

from coordinator.strategies.base import ClientUpdate, MeanDeltaStrategy, Strategy, StrategyContext
from coordinator.strategies.deltasgd import DeltaSgd
from coordinator.strategies.dpfedavg import DPFedAvg
from coordinator.strategies.fedadagrad import FedAdagrad
from coordinator.strategies.fedadam import FedAdam
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.fednova import FedNova
from coordinator.strategies.fedprox import FedProx
from coordinator.strategies.fedyogi import FedYogi
from coordinator.strategies.ifca import Ifca
from coordinator.strategies.robust import CoordinateMedian, Krum, MultiKrum, NormBounding, TrimmedMean
from coordinator.strategies.scaffold import Scaffold
from fedmq.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    strategy.name: strategy
    for strategy in (
        FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold, FedNova, DeltaSgd, Ifca,
        DPFedAvg, NormBounding, CoordinateMedian, TrimmedMean, Krum, MultiKrum,
    )
}


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


def parse_strategy_options(pairs: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings into strategy options.

    A value reads as an int, else a float, else ``true`` or ``false`` as a bool,
    else as the string itself. Raises ConfigError for a pair without ``=`` or key.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not key:
            raise ConfigError(f"--strategy-option must be KEY=VALUE, but got {pair!r}")
        options[key] = _parse_value(text.strip())
    return options


def _parse_value(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "CoordinateMedian",
    "DPFedAvg",
    "DeltaSgd",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedNova",
    "FedProx",
    "FedYogi",
    "Ifca",
    "Krum",
    "MeanDeltaStrategy",
    "MultiKrum",
    "NormBounding",
    "Scaffold",
    "Strategy",
    "StrategyContext",
    "TrimmedMean",
    "load_strategy",
    "parse_strategy_options",
]
