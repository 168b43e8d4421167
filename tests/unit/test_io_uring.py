"""The ctypes io_uring against the host kernel: real syscalls, real files, no ublk."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.ublk.uring import (
    SETUP_DEFER_TASKRUN,
    SETUP_SINGLE_ISSUER,
    SETUP_SQE128,
    Completion,
    IoUring,
    Mapping,
    SubmissionQueueFullError,
)

PAGE = 4096


@pytest.fixture
def ring() -> Iterator[IoUring]:
    with IoUring(8) as r:
        yield r


@pytest.fixture
def buffer() -> Iterator[Mapping]:
    with Mapping.anonymous(4 * PAGE) as m:
        yield m


def collect(ring: IoUring, count: int) -> dict[int, Completion]:
    """Wait until ``count`` completions have arrived; key them by user_data."""
    seen: dict[int, Completion] = {}
    while len(seen) < count:
        for cqe in ring.wait(1):
            assert cqe.user_data not in seen, f"duplicate completion {cqe}"
            seen[cqe.user_data] = cqe
    return seen


def test_mapping_is_page_aligned_zeroed_and_writable(buffer: Mapping) -> None:
    assert buffer.address % PAGE == 0
    view = buffer.view()
    assert bytes(view) == bytes(4 * PAGE)
    view[PAGE : PAGE + 3] = b"abc"
    assert bytes(buffer.buffer()[PAGE : PAGE + 3]) == b"abc"


def test_nop_returns_its_user_data(ring: IoUring) -> None:
    user_data = 0xFEDC_BA98_7654_3210
    ring.prep_nop(user_data=user_data)
    assert ring.submit() == 1
    assert collect(ring, 1) == {user_data: Completion(user_data, 0, 0)}
    assert ring.completions() == []


def test_write_then_read_a_file(ring: IoUring, buffer: Mapping, tmp_path: Path) -> None:
    pattern = bytes(range(256)) * (2 * PAGE // 256)
    path = tmp_path / "data"
    path.write_bytes(bytes(8 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        buffer.view()[: len(pattern)] = pattern
        ring.prep_write(fd, buffer, 3 * PAGE, length=len(pattern), user_data=1)
        assert ring.submit_and_wait(1) == 1
        assert collect(ring, 1)[1].res == len(pattern)
        assert os.pread(fd, len(pattern), 3 * PAGE) == pattern

        ring.prep_read(fd, buffer, 3 * PAGE + 100, length=PAGE, buf_offset=2 * PAGE, user_data=2)
        ring.submit()
        assert collect(ring, 1)[2].res == PAGE
        assert bytes(buffer.view()[2 * PAGE : 3 * PAGE]) == pattern[100 : 100 + PAGE]
    finally:
        os.close(fd)


def test_several_sqes_in_one_enter(ring: IoUring, buffer: Mapping, tmp_path: Path) -> None:
    path = tmp_path / "data"
    pages = [bytes([i + 1]) * PAGE for i in range(4)]
    path.write_bytes(b"".join(pages))
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(4):
            # Read page i into buffer slot 3 - i: every SQE has its own target and offset.
            ring.prep_read(
                fd, buffer, i * PAGE, length=PAGE, buf_offset=(3 - i) * PAGE, user_data=100 + i
            )
        ring.prep_nop(user_data=200)
        assert ring.submit_and_wait(5) == 5
        done = collect(ring, 5)
    finally:
        os.close(fd)
    assert sorted(done) == [100, 101, 102, 103, 200]
    assert all(done[100 + i].res == PAGE for i in range(4))
    view = buffer.view()
    for i in range(4):
        assert bytes(view[(3 - i) * PAGE : (4 - i) * PAGE]) == pages[i]


def test_a_failed_operation_reports_minus_errno(
    ring: IoUring, buffer: Mapping, tmp_path: Path
) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)  # fd is now a closed descriptor
    ring.prep_read(fd, buffer, 0, length=PAGE, user_data=7)
    ring.prep_nop(user_data=8)
    ring.submit()
    done = collect(ring, 2)
    assert done[7].res == -errno.EBADF
    assert done[8].res == 0


def test_get_events_runs_deferred_completions_without_waiting(buffer: Mapping) -> None:
    """With DEFER_TASKRUN a completion that arrives later (a pipe read becoming ready) is only
    posted when the owner asks for events: `get_events` does, and never blocks."""
    read_end, write_end = os.pipe()
    try:
        with IoUring(4, flags=SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN) as ring:
            ring.prep_read(read_end, buffer, 0, length=5, user_data=3)
            assert ring.submit() == 1
            assert ring.get_events() == 0  # nothing to read yet: returns at once
            assert ring.completions() == []
            os.write(write_end, b"hello")
            assert ring.completions() == []  # deferred until the owner enters
            assert ring.get_events() == 0
            assert ring.completions() == [Completion(3, 5, 0)]
            assert bytes(buffer.view()[:5]) == b"hello"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_sqe128_uring_cmd_reaches_the_file(buffer: Mapping, tmp_path: Path) -> None:
    """A regular file has no uring_cmd handler: the kernel must answer -EOPNOTSUPP."""
    path = tmp_path / "plain"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with IoUring(4, flags=SETUP_SQE128) as ring:
            assert ring.sqe_size == 128
            assert ring.cmd_payload_size == 80
            ring.prep_uring_cmd(fd, 0xC0207502, b"\xff" * 80, user_data=9)
            ring.prep_nop(user_data=10)
            ring.submit()
            done = collect(ring, 2)
    finally:
        os.close(fd)
    assert done[9].res == -errno.EOPNOTSUPP
    assert done[10].res == 0


def test_payload_larger_than_the_sqe_is_refused(ring: IoUring) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ring.prep_uring_cmd(0, 1, bytes(17), user_data=0)
    # Nothing was reserved by the refused call.
    assert ring.sq_space_left() == ring.sq_entries


def test_full_submission_queue_is_reported_then_recovers(ring: IoUring) -> None:
    for i in range(ring.sq_entries):
        ring.prep_nop(user_data=i)
    assert ring.sq_space_left() == 0
    with pytest.raises(SubmissionQueueFullError):
        ring.prep_nop(user_data=999)
    assert ring.submit() == ring.sq_entries
    assert sorted(collect(ring, ring.sq_entries)) == list(range(ring.sq_entries))
    # The ring wraps around: another full batch goes through the same slots.
    for i in range(ring.sq_entries):
        ring.prep_nop(user_data=1000 + i)
    ring.submit()
    assert sorted(collect(ring, ring.sq_entries)) == [1000 + i for i in range(ring.sq_entries)]


def test_closed_ring_refuses_use() -> None:
    ring = IoUring(2)
    ring.close()
    ring.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ring.submit()


def test_setup_errors_raise_oserror_with_errno() -> None:
    with pytest.raises(OSError) as info:
        IoUring(0)
    assert info.value.errno == errno.EINVAL
