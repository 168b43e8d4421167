"""Several connections at once: identical contents from many writers, and fio with numjobs > 1."""

from __future__ import annotations

import random
import threading

import nbd
import pytest

from .nbd_helpers import PAGE_SIZE, ServerFactory, assert_clean, run, statistics

pytestmark = pytest.mark.nbd

CONNECTIONS = 4
OWN_PAGES = 256  # each connection's own range
SHARED = range(CONNECTIONS * OWN_PAGES, CONNECTIONS * OWN_PAGES + 64)  # written by all of them
CONTENTS = [random.Random(i).randbytes(PAGE_SIZE) for i in range(16)]


def content(page: int) -> bytes:
    return CONTENTS[page % len(CONTENTS)]


def writer(uri: str, index: int, errors: list[BaseException], start: threading.Barrier) -> None:
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        start.wait()
        own = range(index * OWN_PAGES, (index + 1) * OWN_PAGES)
        for first in range(own.start, own.stop, 16):  # 64 KiB requests
            h.pwrite(b"".join(content(p) for p in range(first, first + 16)), first * PAGE_SIZE)
            shared = SHARED[(first // 16) % len(SHARED)]
            h.pwrite(content(shared), shared * PAGE_SIZE)
        for shared in SHARED:
            h.pwrite(content(shared), shared * PAGE_SIZE)
        h.flush()
        h.shutdown()
    except Exception as exc:
        errors.append(exc)


# PARALLEL lets requests of all connections interleave inside the store (its own lock is then the
# only thing between them); SERIALIZE is the default.
THREAD_MODELS = ["thread-model=parallel", "thread-model=serialize"]


@pytest.mark.parametrize("thread_model", THREAD_MODELS)
def test_connections_writing_the_same_contents_at_once(
    nbd_server: ServerFactory, thread_model: str
) -> None:
    server = nbd_server(8 << 20, params=[thread_model])
    errors: list[BaseException] = []
    start = threading.Barrier(CONNECTIONS)
    threads = [
        threading.Thread(target=writer, args=(server.uri, i, errors, start))
        for i in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for page in range(SHARED.stop):
        assert h.pread(PAGE_SIZE, page * PAGE_SIZE) == content(page), f"page {page}"
    h.shutdown()
    assert server.stop() == 0
    assert_clean(server.store)
    stats = statistics(server.store)
    assert stats.mapped_pages == SHARED.stop
    assert stats.stored_pages == len(CONTENTS)
    assert stats.same_filled_pages == 0


@pytest.mark.parametrize("thread_model", THREAD_MODELS)
def test_fio_numjobs_verified(nbd_server: ServerFactory, thread_model: str) -> None:
    jobs, pages = 4, 2048
    server = nbd_server(jobs * pages * PAGE_SIZE, params=[thread_model])
    run(
        "fio", "--name=jobs", "--ioengine=nbd", f"--uri={server.uri}", f"--numjobs={jobs}",
        "--rw=randwrite", "--bs=4k", f"--size={pages * PAGE_SIZE}",
        f"--offset_increment={pages * PAGE_SIZE}", "--iodepth=8", "--verify=crc32c",
        "--verify_fatal=1", "--group_reporting",
    )  # fmt: skip
    assert server.stop() == 0
    assert_clean(server.store)
    stats = statistics(server.store)
    # fio's verify header names each block's offset: every page is distinct data.
    assert (stats.mapped_pages, stats.stored_pages) == (jobs * pages, jobs * pages)
