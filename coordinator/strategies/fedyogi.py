"""FedYogi: the FedOpt server optimizer with the yogi second moment (Reddi et al., 2021).

The update rule is in coordinator.strategies.fedopt.
"""

from __future__ import annotations

from coordinator.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """Sample-weighted mean delta, then the yogi step of the FedOpt family."""

    name = "fedyogi"
    rule = "yogi"
