"""What server strategies and worker hooks agree on, and the maths both sides use.

The coordinator and the workers exchange strategy data through three channels of
the existing messages, and the names below fix what travels in each:

- ``RoundStart.config``: scalar settings such as the strategy name, the personal
  layer patterns and the federated evaluation interval.
- ``RoundStart.aux``: server tensors, such as SCAFFOLD's control variate or the
  IFCA cluster models.
- ``Update.aux`` and ``Update.metrics``: worker tensors (SCAFFOLD's control variate
  change, the IFCA cluster choice) and local evaluation results.

Worker code imports this module too, so it contains no coordinator state.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import TypeVar

# Round-start config keys.
STRATEGY_KEY = "strategy"
PERSONAL_LAYERS_KEY = "personal_layers"
EVAL_EVERY_KEY = "eval_every"
IFCA_CLUSTERS_KEY = "ifca_clusters"
IFCA_WEIGHTS_CLUSTER_KEY = "ifca_weights_cluster"
DELTA_SGD_AMPLIFIER_KEY = "delta_sgd_amplifier"

# Aux tensor names. A name with a trailing slash is a prefix followed by a state dict name.
SCAFFOLD_CONTROL_PREFIX = "scaffold.c/"
SCAFFOLD_DELTA_PREFIX = "scaffold.delta_c/"
IFCA_CLUSTER_PREFIX = "ifca.cluster"
IFCA_CHOICE = "ifca.choice"

# Metric names of the federated evaluation that workers report in their updates.
LOCAL_TEST_SAMPLES = "local_test_samples"
EVALUATED_MODELS = ("local", "personal")

T = TypeVar("T")


def parse_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Return fnmatch patterns from a comma-separated string or a sequence, without blanks."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"personal layer patterns must be strings, but got {item!r}")
        if item.strip():
            patterns.append(item.strip())
    return tuple(patterns)


def is_personal(name: str, patterns: Iterable[str]) -> bool:
    """Return whether a state dict name matches one of the personal layer patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def split_personal(state: Mapping[str, T], patterns: Iterable[str]) -> tuple[dict[str, T], dict[str, T]]:
    """Split a state dict into its shared and its personal entries."""
    patterns = tuple(patterns)
    shared: dict[str, T] = {}
    personal: dict[str, T] = {}
    for name, value in state.items():
        if is_personal(name, patterns):
            personal[name] = value
        else:
            shared[name] = value
    return shared, personal


def ifca_cluster_name(cluster: int, tensor_name: str) -> str:
    """Return the aux name under which a round start carries one tensor of an IFCA cluster model."""
    return f"{IFCA_CLUSTER_PREFIX}{cluster}/{tensor_name}"


def effective_steps(num_steps: int, momentum: float) -> float:
    """Return how many plain SGD steps of the same gradient ``num_steps`` heavy-ball steps amount to.

    Local SGD with momentum ``beta`` starts from a zero momentum buffer, so with a
    constant gradient g its k-th step moves ``lr * g * (1 - beta**k) / (1 - beta)``.
    The sum over k = 1..num_steps is

        (num_steps - beta * (1 - beta**num_steps) / (1 - beta)) / (1 - beta)

    times ``lr * g``. This is the L1 norm of FedNova's vector ``a_i`` for momentum SGD
    (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization", NeurIPS 2020), and it equals ``num_steps`` when beta is 0.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, but got {num_steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), but got {momentum}")
    if momentum == 0.0:
        return float(num_steps)
    geometric = momentum * (1.0 - momentum**num_steps) / (1.0 - momentum)
    return (num_steps - geometric) / (1.0 - momentum)
