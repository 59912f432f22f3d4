"""``python -m benchmarks [--quick] [--sections ...]``: run the suite and write docs/benchmarks.{json,md}."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import aggregation_bench, codecs_bench, compression_bench, end_to_end_bench, io_bench, report, rounds_bench, training_bench
from benchmarks.common import REPO_ROOT, machine_description
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.tuning import tune_allocator

SECTIONS = ("io", "codecs", "aggregation", "training", "rounds", "compression", "end_to_end")
BROKER_SECTIONS = {"io", "rounds", "end_to_end"}


def _section_runner(name: str, quick: bool, url: str | None) -> Callable[[], dict[str, Any]]:
    if name == "io":
        return lambda: io_bench.run(quick=quick, url=_need(url))
    if name == "codecs":
        return lambda: codecs_bench.run(quick=quick)
    if name == "aggregation":
        return lambda: aggregation_bench.run(quick=quick)
    if name == "training":
        return lambda: training_bench.run(quick=quick)
    if name == "rounds":
        return lambda: rounds_bench.run(quick=quick, url=_need(url))
    if name == "compression":
        return lambda: compression_bench.run(quick=quick)
    return lambda: end_to_end_bench.run(quick=quick, url=_need(url))


def _need(url: str | None) -> str:
    assert url is not None, "this section needs the suite's broker"
    return url


def run_suite(*, quick: bool, sections: tuple[str, ...], output_dir: Path | None) -> dict[str, Any]:
    """Run the sections in order on a private broker and return the results; write them unless ``output_dir`` is None.

    A section that fails is recorded with its error, and the others still run.
    """
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine_description(),
        "load_average_at_start": list(os.getloadavg()),
        "started_unix": time.time(),
        "sections": {},
    }
    node: RabbitMQNode | None = None
    try:
        url = None
        if BROKER_SECTIONS.intersection(sections):
            node = RabbitMQNode()
            node.start()
            url = node.url
        for name in sections:
            print(f"benchmarks: running {name}", file=sys.stderr, flush=True)
            section_started = time.monotonic()
            load_average = list(os.getloadavg())
            try:
                results["sections"][name] = _section_runner(name, quick, url)()
                results["sections"][name]["load_average_at_start"] = load_average
            except Exception as exc:  # recorded in the report, the suite goes on
                results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(f"benchmarks: {name} took {time.monotonic() - section_started:.0f} s", file=sys.stderr, flush=True)
    finally:
        if node is not None:
            node.close()
    results["load_average_at_end"] = list(os.getloadavg())
    results["duration_s"] = round(time.monotonic() - started, 1)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        results = _merge_previous(results, output_dir / "benchmarks.json")
        (output_dir / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / "benchmarks.md").write_text(report.render(results))
    return results


def _merge_previous(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """Keep the sections of an earlier run of the same mode that this run did not repeat."""
    if not path.exists():
        return results
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    if previous.get("mode") != results["mode"] or not isinstance(previous.get("sections"), dict):
        return results
    kept = {name: section for name, section in previous["sections"].items() if name not in results["sections"]}
    if not kept:
        return results
    merged = {**kept, **results["sections"]}
    results["sections"] = {name: merged[name] for name in SECTIONS if name in merged}
    results["merged_from_started_unix"] = previous.get("started_unix")
    results["merged_run_load_averages"] = [previous.get("load_average_at_start"), previous.get("load_average_at_end")]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the fedmq benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats, about 2 minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated sections to run (default: {','.join(SECTIONS)})")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "docs", help="folder for benchmarks.json and benchmarks.md (default: docs)")
    args = parser.parse_args(argv)
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    # The same process settings as the fedmq command (see fedmq.tuning).
    tune_allocator()
    results = run_suite(quick=args.quick, sections=sections, output_dir=args.output_dir)
    failed = [name for name, section in results["sections"].items() if "error" in section]
    print(f"benchmarks: wrote {args.output_dir / 'benchmarks.md'} after {results['duration_s']:.0f} s", file=sys.stderr)
    if failed:
        print(f"benchmarks: sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
