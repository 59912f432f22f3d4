"""Tests of the downlink: model deltas, the worker view, and full models for workers without the base."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.downlink import Downlink, apply_model_delta, encode_model_delta, parse_downlink_codec
from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import BrokerSettings
from fedmq.errors import ConfigError, MessageError
from fedmq.rabbitmq_node import RabbitMQNode
from schemas.codecs import CodecSpec
from schemas.messages import RoundStart, decode_message, encode_message
from tests.tasks.helper_tasks import TinyTask
from worker.service import Worker, WorkerSettings

RUN_TIMEOUT_S = 120.0


def _state(seed: int, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(32, 16, generator=generator) * scale,
        "fc.bias": torch.randn(32, generator=generator) * scale,
        "half.weight": (torch.randn(8, generator=generator) * scale).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


# Pure functions


def test_parse_downlink_codec_full_and_codecs() -> None:
    assert parse_downlink_codec("full") is None
    assert parse_downlink_codec("float32") == CodecSpec("float32")
    assert parse_downlink_codec("q8:block=64") == CodecSpec("q8", block_size=64)
    with pytest.raises(ConfigError, match="downlink codec"):
        parse_downlink_codec("gzip")


def test_float32_delta_reaches_target_closely() -> None:
    base, target = _state(1), _state(2)
    delta = encode_model_delta(target, base, CodecSpec("float32"), rng=np.random.default_rng(0))
    rebuilt = apply_model_delta(base, delta)

    assert set(rebuilt) == set(target)
    for name, tensor in target.items():
        assert rebuilt[name].dtype == tensor.dtype
        assert rebuilt[name].shape == tensor.shape
    assert torch.equal(rebuilt["bn.num_batches_tracked"], target["bn.num_batches_tracked"])
    torch.testing.assert_close(rebuilt["fc.weight"], target["fc.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rebuilt["half.weight"], target["half.weight"], rtol=0, atol=0.02)


def test_delta_survives_the_wire() -> None:
    base, target = _state(1), _state(2)
    delta = encode_model_delta(target, base, CodecSpec("float16"), rng=np.random.default_rng(0))
    start = RoundStart(
        run_id="run", round=2, attempt=0, model_version=1, task="tiny", deadline_unix=time.time() + 60,
        config={}, weights=delta, weights_kind="delta", base_version=0,
    )
    received = decode_message(encode_message(start, lossless_method="auto"))

    assert isinstance(received, RoundStart)
    assert received.weights_kind == "delta"
    assert received.base_version == 0
    local = apply_model_delta(base, delta)
    remote = apply_model_delta(base, received.weights)
    for name in local:
        assert torch.equal(local[name], remote[name]), name


def test_apply_rejects_mismatched_tensors() -> None:
    base = _state(1)
    delta = encode_model_delta(_state(2), base, CodecSpec("float32"), rng=np.random.default_rng(0))
    with pytest.raises(MessageError, match="round_start.weights"):
        apply_model_delta({**base, "extra": torch.zeros(3)}, delta)

    wrong_shape = {**base, "fc.bias": torch.zeros(31)}
    with pytest.raises(MessageError, match="fc.bias.shape"):
        apply_model_delta(wrong_shape, delta)


def test_view_error_does_not_accumulate() -> None:
    """With a lossy downlink the view stays within one delta's rounding of the global model."""
    downlink = Downlink(codec=CodecSpec("q8", block_size=16), seed=0)
    global_state = _state(0)
    naive = {name: tensor.clone() for name, tensor in global_state.items()}
    generator = torch.Generator().manual_seed(5)
    downlink.advance(global_state, 0)
    assert downlink.delta_weights() is None

    for version in range(1, 41):
        previous = global_state
        global_state = {
            name: (tensor + 0.01 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)) if tensor.is_floating_point() else tensor + 1
            for name, tensor in previous.items()
        }
        downlink.advance(global_state, version)
        assert downlink.base_version == version - 1
        # The naive downlink sends each step's change, so its rounding errors add up.
        step = encode_model_delta(global_state, previous, CodecSpec("q8", block_size=16), rng=np.random.default_rng(version))
        naive = apply_model_delta(naive, step)

    view_error = (downlink.view["fc.weight"] - global_state["fc.weight"]).abs().max().item()
    naive_error = (naive["fc.weight"] - global_state["fc.weight"]).abs().max().item()
    # One q8 step rounds by at most max|delta| / 127 per block; the steps here are about 0.04 at most.
    assert view_error < 0.04 / 127 * 2
    assert naive_error > 2 * view_error
    assert torch.equal(downlink.view["bn.num_batches_tracked"], global_state["bn.num_batches_tracked"])


def test_advance_same_version_keeps_delta() -> None:
    downlink = Downlink(codec=CodecSpec("float16"))
    downlink.advance(_state(1), 0)
    downlink.advance(_state(2), 1)
    delta = downlink.delta_weights()
    view = downlink.view
    downlink.advance(_state(3), 1)

    assert downlink.delta_weights() is delta
    assert downlink.view is view


def test_full_codec_never_sends_deltas() -> None:
    downlink = Downlink(codec=None)
    downlink.advance(_state(1), 0)
    downlink.advance(_state(2), 1)

    assert downlink.delta_weights() is None
    assert downlink.needs_full("worker-1")
    assert torch.equal(downlink.view["fc.weight"], _state(2)["fc.weight"])


def test_skipped_version_resets_to_full() -> None:
    downlink = Downlink(codec=CodecSpec("float16"))
    downlink.advance(_state(1), 0)
    downlink.advance(_state(2), 2)

    assert downlink.delta_weights() is None
    assert downlink.base_version == -1


def test_needs_full_follows_held_versions() -> None:
    downlink = Downlink(codec=CodecSpec("float16"))
    downlink.advance(_state(1), 0)
    downlink.note_sent(["a", "b"])
    downlink.advance(_state(2), 1)

    assert not downlink.needs_full("a")
    assert downlink.needs_full("newcomer")
    downlink.note_held("b", -1)
    assert downlink.needs_full("b")
    downlink.note_sent(["b"])
    assert not downlink.needs_full("b")


# Over a real broker


class _Recorder:
    """Wraps a worker's trainer to record the weights kind of every round it trains."""

    def __init__(self, worker: Worker, *, drop_model_after_round: int | None = None, gate: threading.Event | None = None) -> None:
        assert worker.trainer is not None
        self.trainer = worker.trainer
        self.kinds: dict[int, str] = {}
        self._decode_weights = self.trainer.decode_weights
        self._run_round = self.trainer.run_round
        self._drop_after = drop_model_after_round
        # From round 3 on, training waits for the gate, so the run cannot end before the test opens it.
        self._gate = gate
        self.trainer.decode_weights = self._record  # type: ignore[method-assign]
        self.trainer.run_round = self._run_and_maybe_drop  # type: ignore[method-assign]

    def _record(self, start: RoundStart) -> dict[str, torch.Tensor]:
        self.kinds[start.round] = start.weights_kind
        return self._decode_weights(start)

    def _run_and_maybe_drop(self, start: RoundStart) -> tuple[bytes, dict[str, Any]]:
        if self._gate is not None and start.round >= 3:
            assert self._gate.wait(RUN_TIMEOUT_S), "the test did not open the gate"
        result = self._run_round(start)
        if start.round == self._drop_after:
            # The worker loses its copy of the global model, as after a crash without state.
            self.trainer.held_state = None
            self.trainer.held_version = -1
        return result


def _start_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_workers_end_with_coordinator_view(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq()
    broker = BrokerSettings(url=node.url, federation="downlink-e2e", reconnect_timeout_s=30)
    task = TinyTask(num_features=16)
    rounds = 6
    settings = CoordinatorSettings(
        broker=broker, task="tiny", rounds=rounds, run_dir=tmp_path / "run", min_workers=2, min_updates=2,
        round_deadline_s=30.0, join_timeout_s=60.0, codec="float32", lossless="auto", downlink_codec="q8:block=16",
    )
    coordinator = Coordinator(settings, task=task)

    def make_worker(worker_id: str, index: int) -> Worker:
        return Worker(WorkerSettings(broker=broker, task="tiny", worker_id=worker_id, shard_index=index, shard_count=3), task=task)

    steady = make_worker("steady", 0)
    forgetful = make_worker("forgetful", 1)
    late = make_worker("late", 2)
    late_joined = threading.Event()
    recorders = {
        "steady": _Recorder(steady, gate=late_joined),
        "forgetful": _Recorder(forgetful, drop_model_after_round=3, gate=late_joined),
        "late": _Recorder(late),
    }
    failures: list[BaseException] = []

    def guarded(run: Callable[[], Any]) -> Callable[[], None]:
        def body() -> None:
            try:
                run()
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        return body

    coordinator_thread = _start_thread(guarded(coordinator.run), "coordinator")
    threads = [_start_thread(guarded(worker.run), worker.worker_id) for worker in (steady, forgetful)]
    try:
        # The late worker joins while the run is under way.
        _wait_until(lambda: coordinator.completed_rounds >= 2 or bool(failures), "two completed rounds")
        threads.append(_start_thread(guarded(late.run), "late"))
        # Rounds of the tiny task take milliseconds, so without the gate the run could
        # end before the late worker's Join arrives.
        _wait_until(lambda: "late" in coordinator.workers or bool(failures), "the late worker's join")
        late_joined.set()
        coordinator_thread.join(RUN_TIMEOUT_S)
        assert not coordinator_thread.is_alive(), "the coordinator did not finish in time"
    finally:
        late_joined.set()
        for worker in (steady, forgetful, late):
            worker.stop_requested = True
        for thread in threads:
            thread.join(30)
    assert not failures, failures
    assert coordinator.completed_rounds == rounds

    # Who got what: the first round and the rounds after a lost model come in full.
    steady_kinds = recorders["steady"].kinds
    assert steady_kinds == {1: "full", **{r: "delta" for r in range(2, rounds + 1)}}
    forgetful_kinds = recorders["forgetful"].kinds
    assert forgetful_kinds[4] == "full", forgetful_kinds
    assert [forgetful_kinds[r] for r in (1, 2, 3, 5, 6)] == ["full", "delta", "delta", "delta", "delta"]
    late_kinds = recorders["late"].kinds
    first_late = min(late_kinds)
    assert first_late >= 3
    assert late_kinds[first_late] == "full"
    assert all(late_kinds[r] == "delta" for r in late_kinds if r > first_late), late_kinds

    # Every worker's model equals the coordinator's view bit for bit.
    view = coordinator._downlink.view
    assert coordinator._downlink.version == rounds - 1
    for worker in (steady, forgetful, late):
        assert worker.trainer is not None
        assert worker.trainer.held_version == rounds - 1, worker.worker_id
        held = worker.trainer.held_state
        assert held is not None
        for name, tensor in view.items():
            assert torch.equal(held[name], tensor), f"{worker.worker_id}: {name}"
