"""The ublk frontend's translation of requests into store calls, without a kernel.

`read_request` reads each tag's descriptor exactly as the serving loop does from the driver's
shared memory, with the tag's buffer; `RequestHandler.handle` applies a pass of them and commits
and flushes once.  Here the descriptors and buffers are plain memory written by the test; the VM
tier runs the same code against a real /dev/ublkbN.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator

import pytest

from dedupblk.frontends import ublk
from dedupblk.store import Store, StoreFull, open_store
from dedupblk.ublk.abi import (
    IO_DESC,
    UBLK_IO_F_FUA,
    UBLK_IO_OP_DISCARD,
    UBLK_IO_OP_FLUSH,
    UBLK_IO_OP_READ,
    UBLK_IO_OP_WRITE,
    UBLK_IO_OP_WRITE_ZEROES,
)
from dedupblk.ublk.queue import read_request
from tests.conftest import SMALL, rand_page

P = 4096
DEPTH = 8
BUFFER = 4 * P


class Queue:
    """One queue's descriptor array and tag buffers, and a handler over a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.handler = ublk.RequestHandler(store)
        self.descs = (ctypes.c_char * (DEPTH * IO_DESC.size))()
        self.memory = bytearray(DEPTH * BUFFER)
        whole = memoryview(self.memory)
        self.views = [whole[t * BUFFER : (t + 1) * BUFFER] for t in range(DEPTH)]

    def request(self, tag: int, op: int, offset: int, length: int, data: bytes = b"") -> None:
        IO_DESC.pack_into(self.descs, tag * IO_DESC.size, op, length >> 9, offset >> 9, 0)
        self.views[tag][: len(data)] = data

    def run_pass(self, *batches: list[int]) -> dict[int, int]:
        """Answer one pass of these batches of tags (requests that came while one was applied
        form the next)."""
        requests = [[read_request(self.descs, tag, self.views[tag]) for tag in b] for b in batches]
        return dict(self.handler.handle(0, requests))

    def buffer(self, tag: int, length: int) -> bytes:
        return bytes(self.views[tag][:length])


@pytest.fixture
def queue(store_dir: str) -> Iterator[Queue]:
    with open_store(store_dir, group_commit=False) as store:
        yield Queue(store)


def test_writes_are_committed_before_the_pass_answers(queue: Queue, store_dir: str) -> None:
    a, b = rand_page(1), rand_page(2)
    queue.request(0, UBLK_IO_OP_WRITE, 0, 2 * P, a + b)
    queue.request(1, UBLK_IO_OP_WRITE, 5 * P, P, a)
    assert queue.run_pass([0, 1]) == {0: 2 * P, 1: P}
    # Committed, not just pending: a kill now loses nothing the kernel saw complete.
    assert not queue.store._pending
    stats = queue.store.statistics()
    assert (stats.mapped_pages, stats.stored_pages) == (3, 2)
    queue.request(2, UBLK_IO_OP_READ, 0, 3 * P)
    assert queue.run_pass([2]) == {2: 3 * P}
    assert queue.buffer(2, 3 * P) == a + b + bytes(P)


def test_a_durable_store_commits_in_the_background_and_flushes_what_asks(
    store_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How the server opens a store: a durable one (here on a disk) commits in the background,
    # so a pass of plain writes waits for no sync; a FLUSH still makes them durable before it
    # completes.
    with open_store(store_dir, group_commit=None) as store:
        assert store.volatile is None and store.commits_in_background
        queue = Queue(store)
        queue.handler = ublk.RequestHandler(store, commit_each_pass=False)
        syncs: list[int] = []
        real_sync = store._backend.sync
        monkeypatch.setattr(store._backend, "sync", lambda: (syncs.append(1), real_sync()))
        monkeypatch.setattr(store, "commit", lambda: pytest.fail("a pass committed"))
        a = rand_page(1)
        queue.request(0, UBLK_IO_OP_WRITE, 0, P, a)
        assert queue.run_pass([0]) == {0: P}
        queue.request(1, UBLK_IO_OP_READ, 0, P)
        assert queue.run_pass([1]) == {1: P}
        assert queue.buffer(1, P) == a  # read from what is pending or committed
        queue.request(2, UBLK_IO_OP_FLUSH, 0, 0)
        assert queue.run_pass([2]) == {2: 0}
        assert syncs and not store._pending and not store._sealed
    with open_store(store_dir, readonly=True) as store:
        assert store.read(0, P) == a


def test_flush_and_fua_flush_once_per_pass(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    flushes: list[int] = []
    real_flush = queue.store.flush

    def counted_flush() -> None:
        flushes.append(1)
        real_flush()

    monkeypatch.setattr(queue.store, "flush", counted_flush)
    queue.request(0, UBLK_IO_OP_WRITE | UBLK_IO_F_FUA, 0, P, rand_page(3))
    queue.request(1, UBLK_IO_OP_FLUSH, 0, 0)
    queue.request(2, UBLK_IO_OP_READ, 0, P)
    assert queue.run_pass([0, 1, 2]) == {0: P, 1: 0, 2: P}
    assert flushes == [1]
    queue.request(3, UBLK_IO_OP_WRITE, P, P, rand_page(4))
    queue.run_pass([3])
    assert flushes == [1]  # a plain write is committed, not flushed


def test_discard_and_write_zeroes_read_back_as_zeros(queue: Queue) -> None:
    queue.request(0, UBLK_IO_OP_WRITE, 0, 4 * P, rand_page(5) * 4)
    queue.run_pass([0])
    queue.request(1, UBLK_IO_OP_DISCARD, 0, 2 * P)
    queue.request(2, UBLK_IO_OP_WRITE_ZEROES, 2 * P, P)
    assert queue.run_pass([1, 2]) == {1: 0, 2: 0}
    queue.request(3, UBLK_IO_OP_READ, 0, 4 * P)
    queue.run_pass([3])
    assert queue.buffer(3, 4 * P) == bytes(3 * P) + rand_page(5)


def test_a_bad_request_fails_alone(queue: Queue) -> None:
    queue.request(0, UBLK_IO_OP_WRITE, SMALL - P, 2 * P, rand_page(6) * 2)  # past the end
    queue.request(1, 0xFE, 0, P)  # an operation this server does not know
    queue.request(2, UBLK_IO_OP_READ, 0, BUFFER + P)  # larger than the tag's buffer
    queue.request(3, UBLK_IO_OP_WRITE, 0, P, rand_page(7))
    results = queue.run_pass([0, 1, 2, 3])
    assert results == {0: -errno.EINVAL, 1: -errno.EOPNOTSUPP, 2: -errno.EINVAL, 3: P}
    assert queue.store.read(0, P) == rand_page(7)


def test_a_failed_commit_fails_exactly_the_requests_it_covers(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full() -> None:
        raise StoreFull("no free slot")

    monkeypatch.setattr(queue.store, "commit", full)
    queue.request(0, UBLK_IO_OP_WRITE, 0, P, rand_page(8))
    queue.request(1, UBLK_IO_OP_READ, P, P)
    queue.request(2, UBLK_IO_OP_DISCARD, 2 * P, P)
    assert queue.run_pass([0, 1, 2]) == {0: -errno.ENOSPC, 1: P, 2: -errno.ENOSPC}


def test_a_pass_of_several_batches_commits_once_and_answers_in_order(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits: list[int] = []
    real_commit = queue.store.commit

    def counted_commit() -> None:
        commits.append(1)
        real_commit()

    monkeypatch.setattr(queue.store, "commit", counted_commit)
    a, b = rand_page(9), rand_page(10)
    queue.request(3, UBLK_IO_OP_WRITE, 0, P, a)
    queue.request(1, UBLK_IO_OP_WRITE, P, P, b)
    queue.request(2, UBLK_IO_OP_READ, 0, 2 * P)  # arrives while the writes are applied
    batches = [[read_request(queue.descs, t, queue.views[t]) for t in ts] for ts in ([3, 1], [2])]
    assert queue.handler.handle(0, batches) == [(3, P), (1, P), (2, 2 * P)]
    assert commits == [1]
    assert queue.buffer(2, 2 * P) == a + b
