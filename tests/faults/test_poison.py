"""Poison messages on the results queue: each is dead-lettered with its reason, and the run goes on."""

from __future__ import annotations

import pickle
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmq.broker import HEADER_BLOB_QUEUE, HEADER_CHUNK_COUNT, HEADER_PAYLOAD_BYTES, HEADER_REJECT_REASON, HEADER_SHA256
from schemas.messages import SCHEMA_VERSION, RoundStart, Update, encode_message
from schemas.tensors import decode_state, encode_raw
from schemas.wire import FORMAT_VERSION, MAGIC, PREFIX, pack_frame
from tests.faults.helpers import (
    FakeWorker,
    Services,
    apply_mean,
    checkpoint_model,
    checkpoint_state,
    dead_letters,
    queue_depth,
    random_deltas,
    read_metrics,
    wait_until,
)

TIMEOUT_S = 180.0
MAX_UPDATE_BYTES = 1 << 20


class PickleCanary:
    """Unpickling this object creates the file at ``path``, which would prove that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def update_fields(start: RoundStart, worker_id: str, **changes: Any) -> dict[str, Any]:
    fields = {
        "run_id": start.run_id,
        "round": start.round,
        "attempt": start.attempt,
        "model_version": start.model_version,
        "worker_id": worker_id,
        "num_samples": 100,
        "num_steps": 1,
        "metrics": {},
        "codec": "float32",
        "sent_unix": time.time(),
    }
    fields.update(changes)
    return fields


def update_frame(start: RoundStart, worker_id: str, deltas: dict[str, np.ndarray], *, kind: str = "update", schema: int = SCHEMA_VERSION, **changes: Any) -> bytes:
    """Pack an update frame by hand, bypassing the encoder's checks; deltas keep their numpy dtype."""
    tensors = {f"deltas/{name}": encode_raw(values, str(values.dtype)) for name, values in deltas.items()}
    fields = update_fields(start, worker_id, **changes)
    return pack_frame(kind, schema, [fields[name] for name in Update.FIELDS], tensors)


def poison_messages(start: RoundStart, canary: Path, federation: str) -> dict[str, tuple[bytes, str, dict[str, Any]]]:
    """Return each poison message by name, with the rejection reason the coordinator must give it and its headers."""
    good = random_deltas(start, 10)
    fields = update_fields(start, "a")
    field_values = [fields[name] for name in Update.FIELDS]
    # Field values travel in the order of Update.FIELDS, so a cut-short array lacks the last one.
    missing_field = field_values[:-1]
    tensors = {f"deltas/{name}": encode_raw(values, "float32") for name, values in good.items()}

    wrong_shape = dict(good, **{"fc1.weight": good["fc1.weight"].T.copy()})
    wrong_dtype = dict(good, **{"fc1.weight": good["fc1.weight"].astype(np.int64)})
    missing_tensor = {name: values for name, values in good.items() if name != "fc2.bias"}
    extra_tensor = dict(good, **{"fc3.weight": np.zeros((4, 4), np.float32)})
    with_nan = dict(good, **{"fc1.bias": np.full_like(good["fc1.bias"], np.nan)})
    with_inf = dict(good, **{"fc2.weight": np.full_like(good["fc2.weight"], np.inf)})
    oversize = dict(good, **{"fc3.weight": np.zeros(8 * MAX_UPDATE_BYTES // 4, np.float32)})

    header_garbage = b"\xc1\xc1\xc1\xc1"
    reference = {HEADER_CHUNK_COUNT: 2, HEADER_PAYLOAD_BYTES: 1000, HEADER_SHA256: "0" * 64}
    missing_blob = {**reference, HEADER_BLOB_QUEUE: f"{federation}.blob.a.missing"}
    foreign_queue = {**reference, HEADER_BLOB_QUEUE: f"{federation}.worker.b"}
    messages = {
        "not-msgpack": (b"\x93NUMPY\x01\x00 this is not a fedmq frame", "invalid_message"),
        "bad-header": (PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_garbage)) + header_garbage, "invalid_message"),
        "schema-version": (pack_frame("update", SCHEMA_VERSION + 98, field_values, tensors), "invalid_message"),
        "unknown-kind": (pack_frame("gradient", SCHEMA_VERSION, field_values, tensors), "invalid_message"),
        "missing-field": (pack_frame("update", SCHEMA_VERSION, missing_field, tensors), "invalid_message"),
        "round-start": (encode_message(start), "unexpected_kind"),
        "wrong-shape": (update_frame(start, "a", wrong_shape), "wrong_shape"),
        "wrong-dtype": (update_frame(start, "a", wrong_dtype), "wrong_dtype"),
        "missing-tensor": (update_frame(start, "a", missing_tensor), "missing_tensors"),
        "extra-tensor": (update_frame(start, "a", extra_tensor), "unexpected_tensors"),
        "nan": (update_frame(start, "a", with_nan), "non_finite"),
        "inf": (update_frame(start, "a", with_inf), "non_finite"),
        "oversize": (update_frame(start, "a", oversize), "invalid_message"),
        "pickle": (pickle.dumps(PickleCanary(canary)), "invalid_message"),
        "future-round": (update_frame(start, "a", good, round=start.round + 1), "wrong_round"),
    }
    poisons = {name: (body, reason, {}) for name, (body, reason) in messages.items()}
    poisons["missing-blob-queue"] = (b"", "invalid_reference", missing_blob)
    poisons["foreign-queue-reference"] = (b"", "invalid_reference", foreign_queue)
    return poisons


def test_poison_messages_are_dead_lettered(services: Services, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    canary = tmp_path / "unpickled"
    coordinator = services.custom_coordinator(
        {
            "broker": {"federation": services.federation},
            "task": "digits",
            "rounds": 2,
            "run_dir": str(run_dir),
            "min_workers": 3,
            "round_deadline_s": 120.0,
            "max_update_bytes": MAX_UPDATE_BYTES,
        }
    )
    workers = {name: FakeWorker(services.url, services.federation, name, task="digits", num_samples=100) for name in "abc"}
    try:
        for worker in workers.values():
            worker.join()
        a, b, c = workers["a"], workers["b"], workers["c"]
        start = a.wait_for_round(1, timeout_s=TIMEOUT_S, watch=[coordinator])
        initial = {name: tensor.float() for name, tensor in decode_state(start.weights).items()}

        # Every poison, in one burst; the pickle comes from a sender without a worker id header.
        poisons = poison_messages(start, canary, services.federation)
        for name, (body, _, headers) in poisons.items():
            if name == "pickle":
                a.client.publish(a.client.topology.results_exchange, a.client.topology.results_queue, body, message_id=f"poison-{name}")
            else:
                a.publish(body, message_id=f"poison-{name}", headers=headers)
        dead_queue = f"{services.federation}.dead"
        wait_until(lambda: queue_depth(services.url, services.federation, dead_queue) >= len(poisons), timeout_s=TIMEOUT_S, what="the poisons in the dead-letter queue", watch=[coordinator], services=services)

        # Honest updates, then an outlier from c, then c's honest update.
        deltas = {name: random_deltas(start, seed) for seed, name in enumerate("abc", start=20)}
        a.publish(a.update_body(start, deltas["a"]))
        b.publish(b.update_body(b.wait_for_round(1, timeout_s=TIMEOUT_S), deltas["b"]))
        c_start = c.wait_for_round(1, timeout_s=TIMEOUT_S)
        c.publish(c.update_body(c_start, {name: values * 1000 for name, values in deltas["c"].items()}), message_id="poison-outlier")
        c.publish(c.update_body(c_start, deltas["c"]))
        after_round_1 = apply_mean(initial, [(100, deltas[name]) for name in "abc"])

        # Round 2 runs as usual.
        deltas_2 = {name: random_deltas(start, seed) for seed, name in enumerate("abc", start=30)}
        for name, worker in workers.items():
            worker.publish(worker.update_body(worker.wait_for_round(2, timeout_s=TIMEOUT_S, watch=[coordinator]), deltas_2[name]))
        expected = apply_mean({name: value.float() for name, value in after_round_1.items()}, [(100, deltas_2[name]) for name in "abc"])

        assert coordinator.wait(TIMEOUT_S) == 0, services.logs()
    finally:
        for worker in workers.values():
            worker.close()

    # Each poison is in the dead-letter queue with its reason.
    dead = {str(headers.get("fedmq-worker-id", "none")) + "/" + headers[HEADER_REJECT_REASON]: body for headers, body in dead_letters(services.url, services.federation)}
    reasons = Counter(key.split("/", 1)[1].split(":", 1)[0] for key in dead)
    expected_reasons = Counter(reason for _, reason, _ in poisons.values()) + Counter(["norm_outlier"])
    assert reasons == expected_reasons
    assert any("raw_bytes" in key for key in dead)
    assert any(key.startswith("none/invalid_message") for key in dead)

    # The coordinator counted them in round 1, logged each with worker and round, and kept going.
    round_1, round_2 = read_metrics(run_dir)
    assert round_1["rejected"] == dict(expected_reasons)
    assert round_1["workers"] == ["a", "b", "c"]
    assert round_2["rejected"] == {}
    log = coordinator.log()
    for name in [*poisons, "outlier"]:
        lines = [line for line in log.splitlines() if f"rejected message poison-{name} " in line]
        assert len(lines) == 1, name
        # A decoded update is logged with its own round, anything else with the open round.
        assert ("round 2:" if name == "future-round" else "round 1:") in lines[0], lines[0]
        sender = "a"
        if name == "pickle":
            sender = "unknown"
        elif name == "outlier":
            sender = "c"
        assert f"from worker {sender}" in lines[0], lines[0]

    # Nothing was unpickled, and the global model is the mean of the honest updates only.
    assert not canary.exists()
    # The queue that a reference named is still there: a passive declare of a deleted queue raises.
    assert queue_depth(services.url, services.federation, f"{services.federation}.worker.b") == 0
    final = checkpoint_model(run_dir)
    assert checkpoint_state(run_dir)["completed_rounds"] == 2
    for name, value in expected.items():
        assert bool(torch.isfinite(final[name]).all())
        torch.testing.assert_close(final[name].double(), value, rtol=0, atol=1e-6)
