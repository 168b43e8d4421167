"""The ublk frontend: serve a store, or any `BlockDevice`, as a kernel block device /dev/ublkbN.

`RequestHandler` translates the requests of one queue pass into calls on the device and answers
each with its result; `serve` opens a store and hands it to a `dedupblk.ublk.server.Server`,
`serve_block_store` does the same for any device.  The kernel side is `dedupblk.ublk`; life
cycle, crash and recovery: docs/ublk.md; swap safety and placement: docs/swap.md.  `serve` also
keeps the server's counters (`dedupblk.counters`): request counters the handler adds to once per
pass, the store's commit and flush latencies, the counters file ``dedupblk stats`` reads
(`dedupblk.runtime`) and, with ``metrics``, a Prometheus endpoint in this process.
"""

from __future__ import annotations

import collections
import errno
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from dedupblk import served
from dedupblk.counters import ServerCounters
from dedupblk.device import BlockDevice
from dedupblk.errors import DedupblkError, InvalidRequest
from dedupblk.runtime import CountersWriter
from dedupblk.sd_notify import notify
from dedupblk.store import PAGE_SIZE, open_store
from dedupblk.ublk.abi import (
    SECTOR_SHIFT,
    UBLK_IO_F_FUA,
    UBLK_IO_OP_DISCARD,
    UBLK_IO_OP_FLUSH,
    UBLK_IO_OP_READ,
    UBLK_IO_OP_WRITE,
    UBLK_IO_OP_WRITE_ZEROES,
)
from dedupblk.ublk.hardening import harden_process
from dedupblk.ublk.placement import check_placement
from dedupblk.ublk.queue import Request
from dedupblk.ublk.server import BLOCK_SIZE, Server, check_main_thread, signals_blocked

log = logging.getLogger(__name__)

assert BLOCK_SIZE == PAGE_SIZE  # one block of the device is one page of the store
SLOT_CACHE_PAGES: Final = 64  # the store's cache of slot contents, in a server (256 KiB)

_OP_NAMES: Final = {
    UBLK_IO_OP_READ: "READ",
    UBLK_IO_OP_WRITE: "WRITE",
    UBLK_IO_OP_FLUSH: "FLUSH",
    UBLK_IO_OP_DISCARD: "DISCARD",
    UBLK_IO_OP_WRITE_ZEROES: "WRITE_ZEROES",
}
# The store call each operation becomes: the ``op`` label of the request counters.
_METRIC_OPS: Final = {
    UBLK_IO_OP_READ: "read",
    UBLK_IO_OP_WRITE: "write",
    UBLK_IO_OP_FLUSH: "flush",
    UBLK_IO_OP_DISCARD: "trim",
    UBLK_IO_OP_WRITE_ZEROES: "write_zeroes",
}


def errno_result(exc: BaseException, request: str) -> int:
    """The one place a failed request becomes its ublk result: a negative errno.

    A `DedupblkError` carries its errno.  Anything else is a bug: EIO, with the traceback logged.
    """
    if isinstance(exc, DedupblkError):
        log.warning("%s failed: %s", request, exc)
        return -(exc.errno or errno.EIO)
    log.error("%s failed unexpectedly", request, exc_info=exc)
    return -errno.EIO


class RequestHandler:
    """Answers a queue's requests with calls on ``device`` (a `dedupblk.ublk.queue.Handler`).

    Durability order of a pass: every request is applied (pending, not committed), then one
    commit (if anything changed and ``commit_each_pass``), then one flush (if a FLUSH or FUA
    request is among them); a failed commit or flush fails exactly the requests that depended on
    it.  Only then do the results go to the kernel, so a FLUSH or FUA request it completes
    survives a crash of the machine, and with ``commit_each_pass`` every write it completes
    survives a crash of this server.  Without it (a durable store, whose every commit waits for
    the disk: the store commits in the background, within `dedupblk.store.store.GROUP_SECONDS`),
    a crash of the server may lose writes that were never flushed, as a power cut of a disk with
    a volatile write cache may (the device says it has one).  One handler serves every queue.

    With ``metrics``, each pass adds its requests to the counters once per operation, and each
    failed request (its own failure, or its commit's or flush's) to the error counters.
    """

    def __init__(
        self,
        device: BlockDevice,
        metrics: ServerCounters | None = None,
        *,
        commit_each_pass: bool = True,
    ) -> None:
        self.device = device
        self.metrics = metrics
        self.commit_each_pass = commit_each_pass

    def handle(self, q_id: int, batches: Iterable[Sequence[Request]]) -> list[tuple[int, int]]:
        """Answer one pass of queue ``q_id``: ``(tag, result)`` for every request, in order."""
        device = self.device
        tags: list[int] = []
        ops: list[int] = []
        results: list[int] = []
        changed: list[int] = []  # writes, discards, write-zeroes: need the commit
        durable: list[int] = []  # FLUSH and FUA requests: need the flush
        failed = False
        for batch in batches:
            for tag, op_flags, nr_sectors, start_sector, buffer in batch:
                index = len(results)
                op = op_flags & 0xFF
                offset = start_sector << SECTOR_SHIFT
                length = nr_sectors << SECTOR_SHIFT
                tags.append(tag)
                ops.append(op)
                result = 0
                try:
                    if op == UBLK_IO_OP_WRITE:
                        _check_fits(length, len(buffer))
                        device.write(offset, buffer[:length])
                        result = length
                        changed.append(index)
                    elif op == UBLK_IO_OP_READ:
                        _check_fits(length, len(buffer))
                        buffer[:length] = device.read(offset, length)
                        result = length
                    elif op == UBLK_IO_OP_FLUSH:
                        durable.append(index)
                    elif op == UBLK_IO_OP_DISCARD:
                        device.trim(offset, length)
                        changed.append(index)
                    elif op == UBLK_IO_OP_WRITE_ZEROES:
                        device.write_zeroes(offset, length)
                        changed.append(index)
                    else:
                        result = -errno.EOPNOTSUPP
                        failed = True
                    if op_flags & UBLK_IO_F_FUA and result >= 0:
                        durable.append(index)
                except Exception as exc:  # noqa: BLE001 -- every failure becomes this request's errno
                    result = errno_result(exc, _describe(q_id, tag, op, offset, length))
                    failed = True
                results.append(result)
        if changed and self.commit_each_pass:
            failed |= _covering(device.commit, changed, results, f"ublk queue {q_id}: commit")
        if durable:
            failed |= _covering(device.flush, durable, results, f"ublk queue {q_id}: flush")
        if self.metrics is not None:
            _count(self.metrics, ops, results if failed else None)
        return list(zip(tags, results, strict=True))


def _covering(step: Callable[[], None], covered: list[int], results: list[int], what: str) -> bool:
    """Run ``step`` (a commit or a flush); if it fails, so do the requests at ``covered``.
    Whether it failed."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 -- fails exactly the requests it covers
        result = errno_result(exc, what)
        for index in covered:
            results[index] = result
        return True
    return False


def _count(metrics: ServerCounters, ops: list[int], results: list[int] | None) -> None:
    """Add a pass's requests to the counters, one increment per operation; with ``results``
    (some failed), its failures to the error counters."""
    metrics.count_pass(
        (_METRIC_OPS.get(op, "other"), count) for op, count in collections.Counter(ops).items()
    )
    if results is not None:
        for op, result in zip(ops, results, strict=True):
            if result < 0:
                metrics.request_failed(_METRIC_OPS.get(op, "other"), -result)


def _check_fits(length: int, capacity: int) -> None:
    if length > capacity:
        raise InvalidRequest(f"a {length}-byte request exceeds the {capacity}-byte tag buffer")


def _describe(q_id: int, tag: int, op: int, offset: int, length: int) -> str:
    name = _OP_NAMES.get(op, f"op {op}")
    return f"ublk queue {q_id} tag {tag}: {name} at {offset} of {length} bytes"


def serve(
    store_path: str,
    *,
    queues: int = 1,
    depth: int = 64,
    dev_id: int | None = None,
    swap: bool = False,
    swap_priority: int | None = None,
    swap_discard: bool | None = None,
    swap_placement_may_hang: bool = False,
    recover: int | None = None,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Serve the store at ``store_path`` as /dev/ublkbN until SIGTERM/SIGINT/SIGHUP; exit code.

    Prints the block device's path alone on a line of stdout once the device is started (and,
    with ``swap``, swap is on); from then until it stops, the server is in the registry of
    served stores (``dedupblk list``) and systemd has READY=1 (see `Announcement`).  With
    ``metrics`` (address, port), serves Prometheus metrics over HTTP there from the start.
    Raises `DedupblkError` (`InvalidRequest` for bad arguments or an unsafe placement, which
    includes one measured to hang unless ``swap_placement_may_hang``; `UblkError` for the kernel
    side; `MetricsError` for a metrics address that is taken) if serving cannot begin.  Must run
    in the main thread.
    """
    server = Server(
        queues=queues, depth=depth, dev_id=dev_id, swap=swap, swap_priority=swap_priority,
        swap_discard=swap_discard, recover=recover,
    )  # fmt: skip
    check_main_thread()
    with signals_blocked():
        # Hardened before the store opens: its threads inherit the io-flusher flag.
        harden_process(strict=swap)
        # Over a volatile store every pass commits its own batch before answering the kernel: no
        # timed commits (their thread would compete with the queue threads for the GIL). A durable
        # store's commits each wait for the disk (slot data, then LMDB): one a pass would put two
        # syncs in every pass, so it commits in the background (docs/measurements.md, "ublk
        # against zram"). Few slot contents are kept: every byte of this process is locked in
        # memory (docs/measurements.md, "Server memory").
        counted = ServerCounters()
        with open_store(
            store_path, group_commit=None, slot_cache_pages=SLOT_CACHE_PAGES, observer=counted
        ) as store:
            check_placement(
                store.path, store.backend_path, slots_preallocated=store.backend_preallocated,
                swap=swap, serving_dev_id=recover, may_hang=swap_placement_may_hang,
            )  # fmt: skip
            exported = None
            if metrics is not None:
                # Loaded only when asked for: its memory would be locked (`dedupblk.counters`).
                from dedupblk.metrics import ServerMetrics  # noqa: PLC0415

                exported = ServerMetrics(store_path, counted)
                exported.watch(store.statistics)
                exported.serve(metrics)  # before the device exists: a taken port adds none
            counters_file = CountersWriter(store_path, counted.snapshot)
            counters_file.start()
            announcement = Announcement(store.path)
            try:
                return server.run(
                    RequestHandler(
                        store, counted, commit_each_pass=not store.commits_in_background
                    ),
                    size=store.size,
                    on_ready=announcement.ready,
                    on_stopping=announcement.stopping,
                )
            finally:
                announcement.close()
                if exported is not None:
                    exported.stop_serving()  # no scrape of a closed store
                counters_file.stop()


class Announcement:
    """What a ublk server tells others of its state: the registry of served stores
    (`dedupblk.served`: ``dedupblk list`` and ``stop``) and, under a ``Type=notify`` systemd
    unit, systemd (`dedupblk.sd_notify`).  Ready once the device is started, with swap on if
    asked (the moment its path is printed); stopping from the first stop signal on, before
    swapoff; gone once the device is deleted."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.record: Path | None = None

    def ready(self, device: str) -> None:
        self.record = served.register(self.store_path, "ublk", device=device)
        notify("READY=1", f"STATUS=serving {self.store_path} as {device}")

    def stopping(self, device: str) -> None:
        notify("STOPPING=1", f"STATUS=stopping {device}")

    def close(self) -> None:
        served.unregister(self.record)
        self.record = None


def serve_block_store(
    device: BlockDevice, *, queues: int = 1, depth: int = 64, dev_id: int | None = None
) -> int:
    """Serve any `BlockDevice` as /dev/ublkbN the way `serve` serves a dedupblk store, without
    swap, recovery or placement checks; for ``bench/minimal_ublk.py``, whose RAM disk measures
    what this frontend costs on its own.  Same output, signals and exit code as `serve`."""
    server = Server(queues=queues, depth=depth, dev_id=dev_id)
    if device.size <= 0 or device.size % BLOCK_SIZE:
        raise InvalidRequest(f"bad size {device.size}: a positive multiple of {BLOCK_SIZE}")
    check_main_thread()
    with signals_blocked():
        harden_process(strict=False)
        return server.run(RequestHandler(device), size=device.size)
