"""One hardware queue of a ublk device: its thread, ring, descriptors and tag buffers.

A `Queue` keeps a FETCH outstanding for every tag, reads each request the driver hands over
into a `Request`, gives a whole pass of them to its `Handler` and commits the results it returns
(``COMMIT_AND_FETCH_REQ``: result in, next request out).  What the requests mean is the
handler's business, so a handler is tested without a kernel (libublk-rs splits
``UblkQueue::wait_and_handle_io`` the same way).  The life cycle around it: docs/ublk.md.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, NamedTuple, Protocol

from ..errors import UblkError
from .abi import (
    IO_CMD,
    IO_DESC,
    UBLK_IO_RES_ABORT,
    UBLK_IO_RES_OK,
    IoOp,
    desc_array_bytes,
    desc_array_offset,
)
from .hardening import set_io_flusher
from .uring import (
    SETUP_COOP_TASKRUN,
    SETUP_DEFER_TASKRUN,
    SETUP_SINGLE_ISSUER,
    Completion,
    IoUring,
    Mapping,
)

log = logging.getLogger(__name__)

# Set to a directory to profile every queue thread's serving loop (cProfile, one dump per queue).
PROFILE_ENV: Final = "DEDUPBLK_UBLK_PROFILE"


class Request(NamedTuple):
    """One request as the driver describes it (``struct ublksrv_io_desc``), with its tag's buffer.

    ``buffer`` is the whole tag buffer: a WRITE's data is already in it; a READ's data goes into
    it before the result is returned.
    """

    tag: int
    op_flags: int  # the op in the low 8 bits (UBLK_IO_OP_*), UBLK_IO_F_* flags above
    nr_sectors: int  # 512-byte sectors
    start_sector: int
    buffer: memoryview


def read_request(descs: ctypes.Array[ctypes.c_char], tag: int, buffer: memoryview) -> Request:
    """The request in ``tag``'s descriptor of a queue's descriptor array ``descs``."""
    op_flags, nr_sectors, start_sector, _addr = IO_DESC.unpack_from(descs, tag * IO_DESC.size)
    return Request(tag, op_flags, nr_sectors, start_sector, buffer)


class Handler(Protocol):
    """What a queue asks of whoever answers its requests."""

    def handle(self, q_id: int, batches: Iterable[Sequence[Request]]) -> list[tuple[int, int]]:
        """Answer one pass of queue ``q_id``: every request of every batch, in order.

        A pass is one or more batches: requests that arrive while one batch is being applied
        come as the next one, until none is waiting.  Returns ``(tag, result)`` for each
        request: bytes done for READ and WRITE, >= 0 for the rest, or -errno.  Nothing is sent
        to the kernel before it returns, so a result may wait for work that covers the whole
        pass (one commit).  It must not raise for a failed request: a fetched request without
        an answer hangs.
        """
        ...


class Queue:
    """One hardware queue: its own thread, ring, descriptor mapping and per-tag buffers.

    On 6.12 the thread whose FETCHes complete a queue's set-up owns that queue: every FETCH and
    COMMIT for it must come from that thread, which is why the ring is made inside `run`.
    ``notify`` is called (from the queue's thread) once the queue has settled with an error and
    once it has ended.
    """

    def __init__(
        self,
        handler: Handler,
        char_fd: int,
        *,
        q_id: int,
        depth: int,
        buffer_bytes: int,
        notify: Callable[[], None],
    ) -> None:
        self.handler = handler
        self.char_fd = char_fd
        self.q_id = q_id
        self.depth = depth
        self.buffer_bytes = buffer_bytes
        self.notify = notify
        self.settled = threading.Event()  # set once every tag is fetched, or set-up failed
        self.error: BaseException | None = None
        self.aborted = 0  # commands the driver ended with -ENODEV (queue going away)
        self.refused = 0  # commands the driver refused (their tags are dead)
        self.requests = 0  # requests answered
        self.passes = 0  # passes that answered any (one store commit at most each)
        self.thread = threading.Thread(target=self.run, name=f"ublk-queue-{q_id}", daemon=True)
        self._ring: IoUring | None = None
        self._descs: Mapping | None = None
        self._buffers: Mapping | None = None
        self._outstanding = 0  # commands the driver holds
        self._prepared = 0  # commits prepared but not yet submitted

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        try:
            set_io_flusher()
            ring = self._set_up()
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which reports it
            self.error = exc
            self.settled.set()
            self._tear_down()
            self.notify()
            return
        self.settled.set()
        try:
            profile_dir = os.environ.get(PROFILE_ENV)
            if profile_dir:
                _profiled(self._serve, ring, os.path.join(profile_dir, f"queue-{self.q_id}.prof"))
            else:
                self._serve(ring)
        except BaseException as exc:
            log.exception("ublk queue %d stopped on an unexpected error", self.q_id)
            self.error = exc
        finally:
            self._tear_down()
            log.info(
                "ublk queue %d: %d requests in %d passes; %d commands ended by the driver",
                self.q_id, self.requests, self.passes, self.aborted,
            )  # fmt: skip
            self.notify()

    def _set_up(self) -> IoUring:
        flags = SETUP_COOP_TASKRUN | SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN
        try:
            ring = IoUring(self.depth, flags=flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            ring = IoUring(self.depth)  # a kernel without these set-up flags
        self._ring = ring
        self._descs = Mapping.of_file(
            self.char_fd,
            desc_array_bytes(self.depth),
            desc_array_offset(self.q_id),
            writable=False,
        )
        self._buffers = Mapping.anonymous(self.depth * self.buffer_bytes)
        base = self._buffers.address
        for tag in range(self.depth):
            payload = IO_CMD.pack(self.q_id, tag, 0, base + tag * self.buffer_bytes)
            ring.prep_uring_cmd(self.char_fd, IoOp.FETCH_REQ, payload, user_data=tag)
        ring.submit()
        # A FETCH that succeeds completes only when a request arrives; one refused outright is
        # already in the CQ.  A queue missing a tag would keep START_DEV waiting forever.
        for completion in ring.completions():
            raise UblkError(
                f"ublk queue {self.q_id}: FETCH of tag {completion.user_data} refused: "
                f"{os.strerror(-completion.res) if completion.res < 0 else completion.res}"
            )
        return ring

    def _serve(self, ring: IoUring) -> None:
        """Serve until the driver has ended every command of this queue.

        Each pass: one ``io_uring_enter`` submits every commit of the previous pass and waits;
        the handler gets what is ready and whatever arrives while it works (`_batches`), and
        only then are its results prepared as the next commits.
        """
        assert self._descs is not None
        assert self._buffers is not None
        descs = self._descs.buffer()
        buffers = self._buffers.view()
        base = self._buffers.address
        size = self.buffer_bytes
        views = [buffers[tag * size : (tag + 1) * size] for tag in range(self.depth)]
        self._outstanding = self.depth  # every FETCH of _set_up
        self._prepared = 0
        while self._outstanding or self._prepared:
            self._submitted(ring.submit_and_wait(1))
            first = self._requests(ring.completions(), descs, views)
            if not first:
                continue
            results = self.handler.handle(self.q_id, self._batches(ring, first, descs, views))
            self.passes += 1
            self.requests += len(results)
            for tag, result in results:
                payload = IO_CMD.pack(self.q_id, tag, result, base + tag * size)
                ring.prep_uring_cmd(self.char_fd, IoOp.COMMIT_AND_FETCH_REQ, payload, user_data=tag)
                self._prepared += 1

    def _batches(
        self,
        ring: IoUring,
        first: list[Request],
        descs: ctypes.Array[ctypes.c_char],
        views: list[memoryview],
    ) -> Iterator[list[Request]]:
        """The batches of one pass: ``first``, then the requests that arrived while the handler
        applied the previous batch (one commit for all of them: a growing pass is cheaper per
        request than a new one), until none is waiting."""
        batch = first
        while batch:
            yield batch
            self._submitted(ring.get_events())  # submits none, unless the wait stopped early
            batch = self._requests(ring.completions(), descs, views)

    def _submitted(self, count: int) -> None:
        self._outstanding += count
        self._prepared -= count

    def _requests(
        self,
        completions: list[Completion],
        descs: ctypes.Array[ctypes.c_char],
        views: list[memoryview],
    ) -> list[Request]:
        """The requests the completions carry; count the completions that end a tag."""
        self._outstanding -= len(completions)
        requests: list[Request] = []
        for completion in completions:
            if completion.res == UBLK_IO_RES_OK:
                tag = completion.user_data
                requests.append(read_request(descs, tag, views[tag]))
            elif completion.res == UBLK_IO_RES_ABORT:
                self.aborted += 1
            else:
                self.refused += 1
                log.error(
                    "ublk queue %d tag %d: command refused by the driver (%s); tag lost",
                    self.q_id, completion.user_data,
                    os.strerror(-completion.res) if completion.res < 0 else completion.res,
                )  # fmt: skip
        return requests

    def _tear_down(self) -> None:
        """Close the ring (the kernel cancels what is still outstanding) and unmap everything."""
        for resource in (self._ring, self._descs, self._buffers):
            if resource is not None:
                try:
                    resource.close()
                except OSError:
                    log.exception("ublk queue %d: cleanup failed", self.q_id)
        self._ring = self._descs = self._buffers = None


def _profiled(serve: Callable[[IoUring], None], ring: IoUring, dump: str) -> None:
    """Run a queue's serving loop under cProfile and write the statistics to ``dump`` (for
    bench/ublk_bench.py --profile; cProfile slows the loop several times, never set it in use)."""
    import cProfile  # noqa: PLC0415 -- only for profiling runs

    profiler = cProfile.Profile()
    try:
        profiler.runcall(serve, ring)
    finally:
        profiler.dump_stats(dump)
