"""FedYogi: the FedOpt server optimizer with the yogi second moment (Reddi et al., 2021).

The update rule and the choice of the default server learning rate are in
``coordinator.strategies.fedopt``.
"""

from __future__ import annotations

from coordinator.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """Sample-weighted mean delta, then the yogi step of the FedOpt family."""

    name = "fedyogi"
    rule = "yogi"
    default_server_learning_rate = 0.03
