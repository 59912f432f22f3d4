"""The fedmq benchmark suite: ``python -m benchmarks [--quick]`` (``make bench``).

Every figure is a ratio to a reference measured in the same run on the same machine,
so results from different machines compare by their ratios. The suite starts its own
RabbitMQ node on 127.0.0.1 and writes docs/benchmarks.json and docs/benchmarks.md.

Sections:

- ``io``: fresh large allocations with and without the allocator settings, and one
  pika consumer with and without the larger socket reads (fedmq.tuning).
- ``codecs``: encode and decode of state dicts, against a memory copy of their bytes.
- ``aggregation``: the streaming weighted sum, against the plain in-place
  multiply-add; coordinator peak memory, against keeping every update in a list.
- ``training``: a worker's local training and whole round, against a plain torch loop
  over the same data.
- ``rounds``: round overhead with no-op training, against raw pika moving the same
  bytes through the same broker.
- ``compression``: uplink and downlink bytes per round and final accuracy per codec.
- ``end_to_end``: wall time to 95% test accuracy on digits, against centralized training.
"""
