"""The coordinator decodes updates in every codec and dead-letters those whose codec data is invalid."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import HEADER_REJECT_REASON, BrokerClient, BrokerSettings
from fedmq.rabbitmq_node import RabbitMQNode
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import Join, RoundStart, Update, decode_message, encode_message
from schemas.wire import WireTensor
from tests.tasks.helper_tasks import TinyTask

TASK = TinyTask(num_features=40)
TIMEOUT_S = 60.0


def _deltas(spec: codecs.CodecSpec, state: dict[str, torch.Tensor], seed: int) -> dict[str, WireTensor]:
    rng = np.random.default_rng(seed)
    deltas = {}
    for name, tensor in state.items():
        values = rng.standard_normal(tuple(tensor.shape)).astype(np.float32) * 0.01
        encoded = codecs.encode(values, spec, rng=rng)
        deltas[name] = WireTensor(encoded.codec, tuple(encoded.shape), "float32", encoded.arrays, dict(encoded.params))
    return deltas


def _update(start: RoundStart, worker_id: str, deltas: dict[str, WireTensor], codec: str) -> bytes:
    update = Update(
        run_id=start.run_id, round=start.round, attempt=start.attempt, model_version=start.model_version,
        worker_id=worker_id, num_samples=10, num_steps=1, metrics={}, deltas=deltas, codec=codec,
    )
    return encode_message(update)


def _wait_for_round_start(client: BrokerClient, queue_name: str) -> RoundStart:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        method, _, body = client.channel.basic_get(queue_name, auto_ack=True)
        if method is not None:
            message = decode_message(body)
            assert isinstance(message, RoundStart)
            return message
        client.process_events(0.05)
    pytest.fail(f"no round start arrived on {queue_name} within {TIMEOUT_S:.0f} s")


@pytest.mark.slow
def test_codecs_accepted_and_invalid_dead_lettered(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq()
    broker = BrokerSettings(url=node.url, federation="codec-check", reconnect_timeout_s=30)
    valid_specs = [codecs.CodecSpec(name) for name in codecs.CODEC_NAMES]
    workers = [f"w-{spec.name}" for spec in valid_specs] + ["w-bad-params", "w-bad-codes"]
    settings = CoordinatorSettings(
        broker=broker, task="tiny", rounds=1, run_dir=tmp_path / "run", min_workers=len(workers),
        min_updates=len(valid_specs), round_deadline_s=4.0, join_timeout_s=TIMEOUT_S,
    )
    coordinator = Coordinator(settings, task=TASK)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            coordinator.run()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = BrokerClient(broker, client_name="codec-test")
    client.connect()
    try:
        for worker_id in workers:
            client.declare_worker_queue(worker_id)
            client.publish_result(worker_id, encode_message(Join(worker_id=worker_id, task=TASK.name, num_samples=10)))
        start = _wait_for_round_start(client, client.topology.worker_queue(workers[0]))
        template = {name: tensor for name, tensor in coordinator.global_state.items()}

        # One valid update in every codec.
        for seed, (spec, worker_id) in enumerate(zip(valid_specs, workers)):
            client.publish_result(worker_id, _update(start, worker_id, _deltas(spec, template, seed), spec.to_text()))

        # Invalid codec parameters: a block size that is not a power of two.
        bad_params = _deltas(codecs.CodecSpec("q8", block_size=16), template, 100)
        for tensor in bad_params.values():
            tensor.params["block_size"] = 24
        client.publish_result("w-bad-params", _update(start, "w-bad-params", bad_params, "q8:block=24"))

        # Valid layout but invalid data: a q8 code of -128, which no encoder emits.
        bad_codes = _deltas(codecs.CodecSpec("q8"), template, 101)
        first = next(iter(bad_codes.values()))
        first.arrays["codes"] = first.arrays["codes"].copy()
        first.arrays["codes"][0] = -128
        client.publish_result("w-bad-codes", _update(start, "w-bad-codes", bad_codes, "q8"))

        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "the coordinator did not finish in time"
        assert not failures, failures

        # Dead-lettered messages and their reasons.
        reasons: list[str] = []
        while True:
            method, properties, _ = client.channel.basic_get(client.topology.dead_letter_queue, auto_ack=True)
            if method is None:
                break
            reasons.append(str((properties.headers or {})[HEADER_REJECT_REASON]))
    finally:
        client.close()

    record = coordinator.history[-1]
    assert record["accepted"] == len(valid_specs)
    assert record["rejected"].get("invalid_codec") == 1
    assert sum(record["rejected"].values()) == 2
    assert len(reasons) == 2, reasons
    assert sum("block_size" in reason for reason in reasons) == 1, reasons
    assert sum(reason.startswith("invalid_codec") and "codes" in reason for reason in reasons) == 1, reasons
