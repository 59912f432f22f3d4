"""Bookkeeping of one federated round: who was sent it, what came back, when it closes."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedmq.broker import Delivery


@dataclass
class RoundState:
    """The replies to one round so far.

    ``sent`` holds the workers the round start went to. The round may close early
    once ``accepted`` reaches ``target``, and must close at ``deadline_unix``.
    Deliveries of accepted updates are held in ``held`` and acked only after the
    round's checkpoint is written, so a coordinator crash before that point leaves
    them on the queue for its restart.

    ``accepted_messages`` maps each accepted worker to the message id of its
    update. Another update from that worker counts in ``duplicates``, except the
    broker's redelivery of the accepted message itself after a lost connection,
    which counts in ``redelivered``. ``failed`` holds the workers that reported a
    training failure or left during the round, with the reason.
    """

    round: int
    model_version: int
    min_updates: int
    quorum_fraction: float
    deadline_unix: float
    attempt: int = 0
    started_unix: float = field(default_factory=time.time)
    sent: set[str] = field(default_factory=set)
    accepted: dict[str, int] = field(default_factory=dict)
    accepted_messages: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    redelivered: int = 0
    stale: int = 0
    other_run: int = 0
    held: list[Delivery] = field(default_factory=list)
    train_metrics: dict[str, list[float]] = field(default_factory=dict)
    bytes_in: int = 0

    @property
    def target(self) -> int:
        """Accepted updates after which the round closes before its deadline."""
        by_fraction = math.ceil(self.quorum_fraction * len(self.sent))
        return max(self.min_updates, by_fraction)

    @property
    def responded(self) -> set[str]:
        return set(self.accepted) | set(self.failed)

    @property
    def missing(self) -> list[str]:
        return sorted(self.sent - self.responded)

    def quorum_met(self) -> bool:
        return len(self.accepted) >= self.min_updates

    def ready_to_close(self, now: float) -> bool:
        """Return whether the round can close: the target is reached, every sent worker replied, or the deadline passed."""
        if now >= self.deadline_unix:
            return True
        if len(self.accepted) >= self.target:
            return True
        return bool(self.sent) and not self.missing and self.quorum_met()

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "attempts": self.attempt + 1,
            "model_version": self.model_version,
            "sent": len(self.sent),
            "accepted": len(self.accepted),
            "workers": sorted(self.accepted),
            "samples": sum(self.accepted.values()),
            "failed": dict(self.failed),
            "dropouts": self.missing,
            "rejected": dict(self.rejected),
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "stale": self.stale,
            "other_run": self.other_run,
            "bytes_in": self.bytes_in,
        }
