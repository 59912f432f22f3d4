"""Process-wide settings that speed up moving large messages: glibc malloc and pika's socket reads.

Both change global state of the process, so the CLI entry points and BrokerClient
apply them, and library code never needs to.

Allocator
---------

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB on 64-bit
Linux) with a fresh ``mmap`` and returns it to the kernel on ``free``, so every large
message body, decoded tensor or frame that a process builds faults in new zeroed pages.
On the 2-core VM that docs/benchmarks.md describes, copying 100 MB into such a fresh
buffer ran at about 1.9 GB/s against about 12 GB/s into reused memory (see the ``io``
section of ``python -m benchmarks``).

``tune_allocator`` turns glibc's mmap path off (``M_MMAP_MAX = 0``) and raises the trim
threshold (``M_TRIM_THRESHOLD``), so large blocks come from the heap and freed ones are
reused by the next message instead of being faulted in again. The cost: a process keeps
up to ``trim_threshold_bytes`` of freed memory mapped, and memory freed below a live
block at the top of the heap is reused but not returned to the kernel. Peak memory does
not change, but RSS stays near its peak after a large message has been handled.

pika reads
----------

pika 1.3 and 1.4 read the socket at most 4 KiB at a time
(``_AsyncTransportBase._MAX_RECV_BYTES`` in ``pika/adapters/utils/io_services_utils.py``)
and append each read to an immutable ``bytes`` frame buffer, which copies the whole
buffer on every append: a 128 KiB body frame (RabbitMQ's default ``frame_max``) is
copied about 32 times on its way in. pika has no public setting for the read size.
``tune_pika_reads`` raises that class attribute to 256 KiB, two default frames, for the
pika versions it was measured with, where one consumer on loopback went from about
0.4 GB/s to 1 to 1.9 GB/s (the ``io`` section of ``python -m benchmarks``). Other versions
are left alone, because the attribute is private and may change meaning.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import pika
from pika.adapters.utils import io_services_utils

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

DEFAULT_TRIM_THRESHOLD_BYTES = 1 << 30
# mallopt takes an int, so larger thresholds cannot be set.
_MAX_INT = 2**31 - 1


def tune_allocator(*, trim_threshold_bytes: int = DEFAULT_TRIM_THRESHOLD_BYTES) -> bool:
    """Make glibc reuse freed large blocks instead of mapping fresh pages; return whether it applied.

    Call it once at process start, before large buffers exist. Does nothing, and returns
    False, on a C library other than glibc. Raises ValueError for a threshold outside
    1 MiB to 2**31 - 1 bytes.
    """
    if not 1 << 20 <= trim_threshold_bytes <= _MAX_INT:
        raise ValueError(f"trim_threshold_bytes must be from 1 MiB to {_MAX_INT}, but got {trim_threshold_bytes}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        logger.debug("the C library is not glibc; malloc settings unchanged")
        return False

    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1
    if applied:
        logger.debug("glibc %s: large allocations now reuse heap memory (trim threshold %d bytes)", version, trim_threshold_bytes)
    else:
        logger.warning("glibc %s rejected the malloc settings; large allocations keep using mmap", version)
    return applied


PIKA_READ_BYTES = 256 * 1024
# pika releases whose receive path was read and measured: 4 KiB reads into a bytes buffer.
_PIKA_VERSIONS_READ = ("1.3.", "1.4.")
_PIKA_DEFAULT_READ_BYTES = 4096


def tune_pika_reads(read_bytes: int = PIKA_READ_BYTES) -> bool:
    """Raise pika's socket read size to ``read_bytes``; return whether it applied.

    Applies only to pika 1.3 and 1.4, whose transports define ``_MAX_RECV_BYTES``
    as 4096 (or as a value this function set before). Repeating the call changes
    nothing. Raises ValueError for a size outside 4 KiB to 16 MiB.
    """
    if not 4096 <= read_bytes <= 16 << 20:
        raise ValueError(f"read_bytes must be from 4096 to {16 << 20}, but got {read_bytes}")
    transport = getattr(io_services_utils, "_AsyncTransportBase", None)
    current = getattr(transport, "_MAX_RECV_BYTES", None)
    version = str(getattr(pika, "__version__", "unknown"))
    if transport is None or not version.startswith(_PIKA_VERSIONS_READ) or current not in (_PIKA_DEFAULT_READ_BYTES, read_bytes):
        logger.debug("pika %s: socket read size left at %s bytes", version, current)
        return False
    transport._MAX_RECV_BYTES = read_bytes
    return True
