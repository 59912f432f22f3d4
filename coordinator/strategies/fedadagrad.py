"""FedAdagrad: the FedOpt server optimizer with the adagrad second moment (Reddi et al., 2021).

The update rule and the choice of the default server learning rate are in
``coordinator.strategies.fedopt``.
"""

from __future__ import annotations

from coordinator.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """Sample-weighted mean delta, then the adagrad step of the FedOpt family."""

    name = "fedadagrad"
    rule = "adagrad"
    default_server_learning_rate = 0.1
