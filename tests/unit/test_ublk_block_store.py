"""`serve_block_store`: the ublk frontend over any `BlockStore`, here bench/minimal_ublk.py's RAM
disk (the ceiling the ublk benchmark measures), without a kernel; the VM tier runs the kernel."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import ModuleType

import pytest

from dedupblk.frontends import ublk
from dedupblk.store import InvalidRequest
from tests.conftest import rand_page
from tests.unit.test_ublk_requests import BUFFER, DEPTH, P

MINIMAL = Path(__file__).resolve().parents[2] / "bench" / "minimal_ublk.py"


def _minimal_ublk() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minimal_ublk", MINIMAL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_queue_serves_the_ram_disk_like_a_store() -> None:
    disk = _minimal_ublk().RamDisk(64 * P)
    runner = ublk.QueueRunner(disk, -1, q_id=0, depth=DEPTH, buffer_bytes=BUFFER)
    descs = (ublk.ctypes.c_char * (DEPTH * ublk.IO_DESC.size))()
    memory = memoryview(bytearray(DEPTH * BUFFER))
    views = [memory[t * BUFFER : (t + 1) * BUFFER] for t in range(DEPTH)]

    def run_pass(requests: list[tuple[int, int, int]]) -> dict[int, int]:
        for tag, (op, offset, length) in enumerate(requests):
            ublk.IO_DESC.pack_into(descs, tag * ublk.IO_DESC.size, op, length >> 9, offset >> 9, 0)
        work = ublk._Pass()
        runner._apply(list(range(len(requests))), descs, views, work)
        return dict(runner._finish(work))

    data = rand_page(1) + rand_page(2)
    views[0][: len(data)] = data
    assert run_pass([(ublk.UBLK_IO_OP_WRITE, 3 * P, 2 * P)]) == {0: 2 * P}
    assert (
        run_pass([(ublk.UBLK_IO_OP_DISCARD, 4 * P, P), (ublk.UBLK_IO_OP_READ, 3 * P, 2 * P)])[1]
        == 2 * P
    )
    assert bytes(views[1][: 2 * P]) == data[:P] + bytes(P)
    assert run_pass([(ublk.UBLK_IO_OP_READ, 63 * P, 2 * P)])[0] < 0  # past the end: an errno


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queues": 0}, "bad queue count"),
        ({"depth": 0}, "bad queue depth"),
        ({"dev_id": -1}, "bad device id"),
    ],
)
def test_serve_block_store_refuses_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    disk = _minimal_ublk().RamDisk(P)
    with pytest.raises(InvalidRequest, match=message):
        ublk.serve_block_store(disk, **kwargs)


def test_serve_block_store_must_run_in_the_main_thread() -> None:
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            ublk.serve_block_store(_minimal_ublk().RamDisk(P))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], InvalidRequest)
    assert "main thread" in str(errors[0])
