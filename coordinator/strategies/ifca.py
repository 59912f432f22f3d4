"""IFCA: the iterative federated clustering algorithm (Ghosh et al., "An Efficient
Framework for Clustered Federated Learning", NeurIPS 2020), model-averaging variant.

The server keeps K cluster models. In each round:

1. The round start carries every cluster model: the one with index
   ``ifca_weights_cluster`` (config) in ``weights`` and the others in ``aux`` under
   ``ifca.cluster<k>/<tensor>``.
2. Each worker computes the loss of every cluster model on its local training data,
   trains the one with the lowest loss, sends its delta against that model and
   reports the index in ``Update.aux["ifca.choice"]``.
3. The server averages the updates of each cluster separately (sample-weighted, like
   FedAvg) into that cluster's model. A cluster that no worker chose stays unchanged.

Cluster 0 starts from the run's initial global model and cluster k from a model
built under ``torch.manual_seed(seed + k)``, so the clusters start apart. The global
model that the coordinator evaluates and checkpoints is the cluster that received
the most samples in the last round. Every cluster model is saved in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import WeightedSum, ZeroWeightError, apply_mean_delta
from coordinator.strategies.base import ClientUpdate, Strategy
from coordinator.strategies.common import IFCA_CHOICE, IFCA_CLUSTERS_KEY, IFCA_WEIGHTS_CLUSTER_KEY, ifca_cluster_name
from coordinator.validation import RejectedUpdate
from fedmq.errors import CheckpointError, ConfigError


class Ifca(Strategy):
    """Server side of IFCA (see the module docstring)."""

    name = "ifca"

    def __init__(self, *, num_clusters: int = 2, server_learning_rate: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 2:
            raise ValueError(f"num_clusters must be an integer >= 2, but got {num_clusters!r}")
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        self.num_clusters = num_clusters
        self.server_learning_rate = server_learning_rate
        self.clusters: list[dict[str, torch.Tensor]] = []
        self.weights_cluster = 0
        self._template: dict[str, torch.Tensor] = {}
        self._sums: dict[int, WeightedSum] = {}
        self._members: dict[int, list[str]] = {}

    # Round start

    def round_config(self, round_number: int) -> dict[str, Any]:
        return {
            **super().round_config(round_number),
            IFCA_CLUSTERS_KEY: self.num_clusters,
            IFCA_WEIGHTS_CLUSTER_KEY: self.weights_cluster,
        }

    def round_aux(self, round_number: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        aux = {}
        for index, cluster in enumerate(self.clusters):
            if index != self.weights_cluster:
                aux.update({ifca_cluster_name(index, name): tensor for name, tensor in cluster.items()})
        return aux

    # Collecting updates

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._template = dict(template)
        if not self.clusters:
            self.clusters = self._initial_clusters(template)
        else:
            self._check_clusters_match(template)
        self._sums = {}
        self._members = {index: [] for index in range(self.num_clusters)}

    def check_update(self, update: ClientUpdate) -> None:
        if IFCA_CHOICE not in update.aux:
            raise RejectedUpdate("missing_cluster_choice", f"IFCA update lacks the strategy tensor {IFCA_CHOICE!r}")
        choice = np.asarray(update.aux[IFCA_CHOICE])
        if choice.size != 1 or choice.dtype.kind not in "iu":
            raise RejectedUpdate("invalid_cluster_choice", f"{IFCA_CHOICE!r} must be one integer, but came as {choice.dtype} of shape {list(choice.shape)}")
        index = int(choice.reshape(-1)[0])
        if not 0 <= index < self.num_clusters:
            raise RejectedUpdate("invalid_cluster_choice", f"{IFCA_CHOICE!r} must be in [0, {self.num_clusters}), but got {index}")

    def add_update(self, update: ClientUpdate) -> None:
        if not self._template:
            raise RuntimeError("strategy ifca: add_update came before begin_round")
        index = int(np.asarray(update.aux[IFCA_CHOICE]).reshape(-1)[0])
        if index not in self._sums:
            self._sums[index] = WeightedSum(self._template)
        self._sums[index].add(update.values, float(update.num_samples))
        self._members[index].append(update.worker_id)

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weighted = {index: total for index, total in self._sums.items() if total.total_weight > 0}
        if not weighted:
            count = sum(total.count for total in self._sums.values())
            raise ZeroWeightError(f"all {count} updates had zero weight")
        for index, total in weighted.items():
            self.clusters[index] = apply_mean_delta(self.clusters[index], total.mean(), learning_rate=self.server_learning_rate)

        # The global model is the cluster with the most samples this round.
        samples = {index: total.total_weight for index, total in weighted.items()}
        self.weights_cluster = max(sorted(samples), key=lambda index: samples[index])
        new_state = {name: tensor.clone() for name, tensor in global_state.items()}
        new_state.update({name: tensor.clone() for name, tensor in self.clusters[self.weights_cluster].items()})
        return new_state

    def round_summary(self) -> dict[str, Any]:
        return {
            "weights_cluster": self.weights_cluster,
            "cluster_samples": [int(self._sums[index].total_weight) if index in self._sums else 0 for index in range(self.num_clusters)],
            "members": {str(index): sorted(workers) for index, workers in self._members.items()},
        }

    # Checkpoint

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, cluster in enumerate(self.clusters):
            tensors.update({f"cluster{index}/{name}": tensor for name, tensor in cluster.items()})
        return tensors

    def state_scalars(self) -> dict[str, Any]:
        return {"num_clusters": self.num_clusters, "weights_cluster": self.weights_cluster}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        saved = int(scalars.get("num_clusters", self.num_clusters))
        if saved != self.num_clusters:
            raise CheckpointError(
                f"the checkpoint contains {saved} IFCA clusters, but this run requests {self.num_clusters}; "
                "resume with the same num_clusters"
            )
        clusters: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_clusters)]
        for key, tensor in tensors.items():
            prefix, _, name = key.partition("/")
            index = int(prefix.removeprefix("cluster"))
            clusters[index][name] = tensor.clone()
        self.clusters = clusters if tensors else []
        self.weights_cluster = int(scalars.get("weights_cluster", 0))

    # Helpers

    def _initial_clusters(self, template: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        build_state = self.context.build_state
        if build_state is None:
            raise ConfigError("strategy ifca needs StrategyContext.build_state to initialise its cluster models")
        clusters = [{name: tensor.clone() for name, tensor in template.items()}]
        for index in range(1, self.num_clusters):
            state = build_state(self.context.seed + index)
            clusters.append({name: state[name].to(tensor.dtype).clone() for name, tensor in template.items()})
        return clusters

    def _check_clusters_match(self, template: Mapping[str, torch.Tensor]) -> None:
        for index, cluster in enumerate(self.clusters):
            if set(cluster) != set(template):
                raise CheckpointError(
                    f"IFCA cluster {index} contains tensors {sorted(set(cluster) ^ set(template))[:5]} that differ from "
                    "the shared tensors of this run; resume with the same task and personal layers"
                )
