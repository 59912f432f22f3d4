"""A model many times larger than the broker's max_message_size still trains: chunked round starts, updates by reference."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from fedmq.rabbitmq_node import RabbitMQNode
from tests.faults.helpers import WIDE_TASK, Services, read_metrics

BROKER_LIMIT_BYTES = 128 * 1024


def test_wide_model_over_small_message_limit(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path, federation: str) -> None:
    node = make_rabbitmq(max_message_size=BROKER_LIMIT_BYTES)
    run_dir = tmp_path / "run"
    with Services(tmp_path / "logs", node.url, federation) as services:
        # The coordinator is configured with the broker's limit. The workers keep the 15 MiB default and learn it.
        coordinator = services.coordinator(
            run_dir, "--rounds", "2", "--min-workers", "2", "--round-deadline-s", "120",
            "--max-message-bytes", str(BROKER_LIMIT_BYTES), task=WIDE_TASK,
        )
        workers = [services.worker(f"w{index}", f"{index - 1}/2", task=WIDE_TASK) for index in (1, 2)]

        assert coordinator.wait(240) == 0, services.logs()

    records = read_metrics(run_dir)
    assert [record["workers"] for record in records] == [["w1", "w2"], ["w1", "w2"]]
    assert records[-1]["eval"]["accuracy"] > 0.5
    chunk_counts = [int(count) for count in re.findall(r"published message \w+ in (\d+) chunks", coordinator.log())]
    # The full model of about 2.5 MB goes out in more chunks than a worker's prefetch window of 8.
    assert max(chunk_counts) > 8
    for worker in workers:
        log = worker.log()
        assert log.count(f"lowering max_message_bytes from 15728640 to {BROKER_LIMIT_BYTES}") == 1
        update_chunks = [int(count) for count in re.findall(r"by reference through \S+ \((\d+) chunks", log)]
        assert len(update_chunks) == 2
        assert min(update_chunks) >= 4
