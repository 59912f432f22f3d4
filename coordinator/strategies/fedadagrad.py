"""FedAdagrad: the FedOpt server optimizer with the adagrad second moment (Reddi et al., 2021).

The update rule is in coordinator.strategies.fedopt.
"""

from __future__ import annotations

from coordinator.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    """Sample-weighted mean delta, then the adagrad step of the FedOpt family."""

    name = "fedadagrad"
    rule = "adagrad"
