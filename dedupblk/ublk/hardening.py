"""Keep a block server out of memory reclaim on its own device.

A server that swaps, or waits for reclaim that waits for its device, deadlocks.  `harden_process`
does what a process can: ``PR_SET_IO_FLUSHER``, ``oom_score_adj`` -1000, a heap malloc does not
give back, ``mlockall``; `set_io_flusher` again in every server thread.  What it cannot do, and
where a swap store's files must live therefore: docs/swap.md.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from collections.abc import Callable
from typing import Final

from ..errors import UblkError
from ..libc import function, os_error

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER: Final = 57  # linux/prctl.h
# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_TOP_PAD: Final = -2
M_MMAP_MAX: Final = -4
M_ARENA_MAX: Final = -8
MALLOC_TOP_PAD_BYTES: Final = 256 << 10
# Every thread's stack is locked in full under mlockall (8 MiB by default): the server's threads
# run shallow Python (a request handler, the store, a control command), far less than this.
THREAD_STACK_BYTES: Final = 256 * 1024
MCL_CURRENT: Final = 1  # sys/mman.h
MCL_FUTURE: Final = 2

_prctl = function(
    "prctl", ctypes.c_int,
    ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
)  # fmt: skip
_mlockall = function("mlockall", ctypes.c_int, ctypes.c_int)
_mallopt = function("mallopt", ctypes.c_int, ctypes.c_int, ctypes.c_int)


def harden_process(*, strict: bool) -> None:
    """Process-wide swap safety; failures are fatal with ``strict`` (swap), warnings otherwise.

    Call it first in the main thread, before any thread exists: the io-flusher flag is inherited
    by new threads (the store's too) and by the swap tools run as children.
    """
    steps: list[tuple[str, Callable[[], None]]] = [
        ("prctl(PR_SET_IO_FLUSHER)", set_io_flusher),
        ("oom_score_adj -1000", protect_from_oom_killer),
        ("mallopt", keep_heap),
        ("thread stacks", small_stacks),
        ("mlockall", lock_memory),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as exc:
            if strict:
                raise UblkError(f"swap safety: {what} failed: {exc.strerror}") from exc
            log.warning("%s failed (%s): the device must not be used for swap", what, exc.strerror)


def set_io_flusher() -> None:
    """Mark the calling thread as part of the I/O path: its allocations never wait for I/O
    (PF_MEMALLOC_NOIO), so reclaim cannot make it wait for its own device.  Argument 1 sets it;
    0 would clear it."""
    if _prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        raise os_error("prctl(PR_SET_IO_FLUSHER, 1)")


def protect_from_oom_killer() -> None:
    with open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("-1000\n")


def keep_heap() -> None:
    """Make malloc keep what it got (no trimming, no mmap per large block), grow in 256 KiB steps,
    and serve every thread from one arena: freed request buffers are reused instead of being
    returned to the kernel and faulted in (and, under mlockall, locked) again on the next pass,
    and no thread gets an arena of its own to lock."""
    for param, value in (
        (M_TRIM_THRESHOLD, -1),
        (M_MMAP_MAX, 0),
        (M_TOP_PAD, MALLOC_TOP_PAD_BYTES),
        (M_ARENA_MAX, 1),
    ):
        if _mallopt(param, value) != 1:  # mallopt returns 1 on success and sets no errno
            raise OSError(errno.EINVAL, f"mallopt({param}, {value}) refused")


def small_stacks() -> None:
    """Threads started from now on get `THREAD_STACK_BYTES` of stack."""
    try:
        threading.stack_size(THREAD_STACK_BYTES)
    except (ValueError, RuntimeError) as exc:
        raise OSError(errno.EINVAL, f"thread stack size refused: {exc}") from exc


def lock_memory() -> None:
    """``mlockall(MCL_CURRENT | MCL_FUTURE)``: the server never faults on its own device."""
    if _mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise os_error("mlockall")
