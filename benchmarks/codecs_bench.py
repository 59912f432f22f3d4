"""Section ``codecs``: encode and decode of whole state dicts, against a memory copy of their bytes.

Encode is the worker's path from float32 deltas to the bytes of an Update message
(``schemas.codecs.encode`` per tensor, then ``encode_message`` without a lossless
stage). Decode is the coordinator's path from those bytes to float32 arrays ready to
sum (``decode_message`` then ``coordinator.validation.decode_update``, which checks
every value). The reference copies the state dict's float32 bytes between two warm
buffers with ``numpy.copyto``. Error feedback is not part of encode here. Each figure
is the best mean of batches of back-to-back calls that last about 50 ms each, as timeit
measures, so that calls of under a millisecond are not dominated by the timer.

The section also records what a fresh process pays before its first encode: the import
of ``schemas.codecs``, then the first encode and decode with every codec, which imports
numba and compiles the codec kernels (empty numba cache) or loads them (warm cache).
Each is measured in a new interpreter with an empty cache folder of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, best_time_per_call_s, ratio
from coordinator.validation import decode_update, expected_tensors
from schemas import codecs
from schemas.messages import Update, decode_message, encode_message
from schemas.wire import WireTensor

FULL_SIZES = (1_000_000, 11_000_000, 100_000_000)
QUICK_SIZES = (100_000, 1_000_000)
CODEC_TEXTS = ("float32", "float16", "bfloat16", "q8", "q4", "topk:fraction=0.01", "topk_q8:fraction=0.01")
LAYER_WIDTH = 1024


def make_state(num_params: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return float32 tensors shaped like linear layers (rows x 1024 plus biases) with about ``num_params`` values."""
    layers = int(min(40, max(4, num_params // 2_500_000)))
    rows = max(1, num_params // (layers * (LAYER_WIDTH + 1)))
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        # Filled in place, so building the state leaves no temporaries behind.
        state[f"layer{layer}.weight"] = torch.empty(rows, LAYER_WIDTH).normal_(0.0, 0.01, generator=generator)
        state[f"layer{layer}.bias"] = torch.empty(rows).normal_(0.0, 0.01, generator=generator)
    return state


def encode_update(state: dict[str, torch.Tensor], spec: codecs.CodecSpec, rng: np.random.Generator) -> bytes:
    """Encode float32 deltas into the bytes of an Update, as a worker does."""
    deltas: dict[str, WireTensor] = {}
    for name, tensor in state.items():
        encoded = codecs.encode(tensor.numpy(), spec, rng=rng)
        deltas[name] = WireTensor(encoded.codec, tuple(encoded.shape), encoded.dtype, encoded.arrays, dict(encoded.params))
    update = Update(
        run_id="bench", round=1, attempt=0, model_version=0, worker_id="w", num_samples=1, num_steps=1,
        metrics={}, deltas=deltas, codec=spec.to_text(),
    )
    return encode_message(update, lossless_method="none")


def decode_update_body(body: bytes, expected: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode Update bytes into float32 arrays, as the coordinator does before summing."""
    update = decode_message(body)
    assert isinstance(update, Update)
    return decode_update(update, expected)


def run(*, quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    repeats = 2 if quick else 3
    started = time.monotonic()
    results = []
    for num_params in sizes:
        state = make_state(num_params)
        actual_params = sum(tensor.numel() for tensor in state.values())
        expected = expected_tensors(state)
        source = np.concatenate([tensor.numpy().reshape(-1) for tensor in state.values()])
        target = np.empty_like(source)
        target[...] = 0.0
        copy_s = best_time_per_call_s(lambda: np.copyto(target, source), repeats=repeats + 2)
        del source, target

        for text in CODEC_TEXTS:
            spec = codecs.CodecSpec.parse(text)
            rng = np.random.default_rng(0)
            body = encode_update(state, spec, rng)
            encode_s = best_time_per_call_s(lambda: encode_update(state, spec, rng), repeats=repeats)
            decode_s = best_time_per_call_s(lambda: decode_update_body(body, expected), repeats=repeats)
            results.append(
                {
                    "params": actual_params,
                    "codec": text,
                    "message_bytes": len(body),
                    "bytes_per_param": round(len(body) / actual_params, 4),
                    "copy_s": round(copy_s, 7),
                    "encode_s": round(encode_s, 7),
                    "decode_s": round(decode_s, 7),
                    "encode_vs_copy": ratio(copy_s, encode_s),
                    "decode_vs_copy": ratio(copy_s, decode_s),
                }
            )
            del body
        del state
    return {
        "reference": "numpy.copyto of the state dict's float32 bytes between two warm buffers",
        "targets": {"decode_vs_copy": ">= 1.0", "encode_vs_copy": ">= 0.7"},
        "repeats": repeats,
        "results": results,
        "first_call": measure_first_call(),
        "duration_s": round(time.monotonic() - started, 1),
    }


def measure_first_call() -> dict[str, float]:
    """Return the import and first-call times of the codecs in new interpreters, with a cold and a warm numba cache."""
    with tempfile.TemporaryDirectory(prefix="fedmq-numba-cache-") as cache:
        cold = _run_first_call(cache)
        warm = _run_first_call(cache)
    return {
        "import_codecs_s": warm["import_s"],
        "first_call_cold_cache_s": cold["first_call_s"],
        "first_call_warm_cache_s": warm["first_call_s"],
    }


# Imports schemas.codecs in a fresh interpreter, then encodes and decodes 1,000 values
# with every codec, and prints both durations as JSON.
_FIRST_CALL_SCRIPT = """
import json, time
import numpy as np
started = time.perf_counter()
from schemas import codecs
imported = time.perf_counter()
values = np.linspace(-1.0, 1.0, 1000, dtype=np.float32)
rng = np.random.default_rng(0)
for name in codecs.CODEC_NAMES:
    encoded = codecs.encode(values, codecs.CodecSpec(name), rng=rng)
    codecs.decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)
finished = time.perf_counter()
print(json.dumps({"import_s": round(imported - started, 3), "first_call_s": round(finished - imported, 3)}))
"""


def _run_first_call(cache: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL_SCRIPT],
        cwd=REPO_ROOT,
        env={**os.environ, "NUMBA_CACHE_DIR": cache},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the first-call probe failed with exit status {completed.returncode}:\n{completed.stderr[-3000:]}")
    result: dict[str, float] = json.loads(completed.stdout)
    return result
