"""FedAdam: the FedOpt server optimizer with the adam second moment (Reddi et al., 2021).

The update rule and the choice of the default server learning rate are in
``coordinator.strategies.fedopt``.
"""

from __future__ import annotations

from coordinator.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """Sample-weighted mean delta, then the adam step of the FedOpt family."""

    name = "fedadam"
    rule = "adam"
    default_server_learning_rate = 0.03
