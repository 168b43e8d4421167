"""`serve_block_store`: the ublk frontend over any `BlockDevice`, here `dedupblk.ramdisk.RamDisk`
(the ceiling the ublk benchmark measures), without a kernel; the VM tier runs the kernel."""

from __future__ import annotations

import ctypes
import errno
import signal
import threading

import pytest

from dedupblk.errors import InvalidRequest
from dedupblk.frontends import ublk
from dedupblk.ramdisk import RamDisk
from dedupblk.ublk import server as ublk_server
from dedupblk.ublk.abi import IO_DESC, UBLK_IO_OP_DISCARD, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE
from dedupblk.ublk.queue import read_request
from dedupblk.ublk.server import Server
from tests.conftest import rand_page
from tests.unit.test_ublk_requests import BUFFER, DEPTH, P


@pytest.fixture
def no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may harden this process or talk to /dev/ublk-control."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached the device")

    monkeypatch.setattr(ublk, "harden_process", refuse)
    monkeypatch.setattr(ublk_server, "Control", refuse)


def test_a_queue_serves_the_ram_disk_like_a_store() -> None:
    disk = RamDisk(64 * P)
    handler = ublk.RequestHandler(disk)
    descs = (ctypes.c_char * (DEPTH * IO_DESC.size))()
    memory = memoryview(bytearray(DEPTH * BUFFER))
    views = [memory[t * BUFFER : (t + 1) * BUFFER] for t in range(DEPTH)]

    def run_pass(requests: list[tuple[int, int, int]]) -> dict[int, int]:
        for tag, (op, offset, length) in enumerate(requests):
            IO_DESC.pack_into(descs, tag * IO_DESC.size, op, length >> 9, offset >> 9, 0)
        batch = [read_request(descs, tag, views[tag]) for tag in range(len(requests))]
        return dict(handler.handle(0, [batch]))

    data = rand_page(1) + rand_page(2)
    views[0][: len(data)] = data
    assert run_pass([(UBLK_IO_OP_WRITE, 3 * P, 2 * P)]) == {0: 2 * P}
    discard_then_read = [(UBLK_IO_OP_DISCARD, 4 * P, P), (UBLK_IO_OP_READ, 3 * P, 2 * P)]
    assert run_pass(discard_then_read) == {0: 0, 1: 2 * P}
    assert bytes(views[1][: 2 * P]) == data[:P] + bytes(P)
    past_the_end = [(UBLK_IO_OP_READ, 63 * P, 2 * P), (UBLK_IO_OP_WRITE, 63 * P, 2 * P)]
    assert run_pass(past_the_end) == {0: -errno.EINVAL, 1: -errno.EINVAL}
    # Still 64 pages, and the refused write left none of its bytes in the last one.
    assert disk.size == 64 * P
    assert disk.read(63 * P, P) == bytes(P)


@pytest.mark.parametrize(
    ("kwargs", "size", "message"),
    [
        ({"queues": 0}, P, "bad queue count"),
        ({"depth": 0}, P, "bad queue depth"),
        ({"dev_id": -1}, P, "bad device id"),
        ({}, 0, "bad size"),
        ({}, P + 512, "bad size"),
    ],
)
@pytest.mark.usefixtures("no_device")
def test_serve_block_store_refuses_bad_arguments(
    kwargs: dict[str, int], size: int, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        ublk.serve_block_store(RamDisk(size), **kwargs)


@pytest.mark.usefixtures("no_device")
def test_serve_block_store_must_run_in_the_main_thread() -> None:
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            ublk.serve_block_store(RamDisk(P))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], InvalidRequest)
    assert "main thread" in str(errors[0])


def test_serve_block_store_hardens_then_serves_the_store_with_signals_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, object]] = []

    def harden(*, strict: bool) -> None:
        calls.append(("harden", strict))
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def run(server: Server, handler: object, *, size: int) -> int:
        assert isinstance(handler, ublk.RequestHandler)
        calls.append(("run_on", handler.device))
        assert (server.queues, server.depth, server.dev_id) == (2, 16, 7)
        assert not server.swap
        assert server.recover is None
        assert size == P
        return 3

    monkeypatch.setattr(ublk, "harden_process", harden)
    monkeypatch.setattr(Server, "run", run)
    disk = RamDisk(P)
    assert ublk.serve_block_store(disk, queues=2, depth=16, dev_id=7) == 3
    assert calls == [("harden", False), ("run_on", disk)]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
