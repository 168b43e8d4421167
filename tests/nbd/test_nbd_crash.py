"""SIGKILL during a write stream: after a restart the store checks clean and flushed data is
intact; pages of the interrupted stream read as their old or one of their new contents."""

from __future__ import annotations

import random
import threading

import nbd
import pytest

from .nbd_helpers import PAGE_SIZE, ServerFactory, assert_clean

pytestmark = pytest.mark.nbd

FLUSHED = range(512)
STREAMED = range(512, 1536)
STREAM_CONTENTS = [random.Random(100 + i).randbytes(PAGE_SIZE) for i in range(32)]


def flushed_content(page: int) -> bytes:
    return random.Random(page).randbytes(PAGE_SIZE) if page % 3 else b"\x5c" * PAGE_SIZE


def stream(uri: str, started: threading.Event, stop: threading.Event) -> None:
    """Write until the server dies: random pages of STREAMED, contents from a small set."""
    rng = random.Random(5)
    h = nbd.NBD()
    h.connect_uri(uri)
    done = 0
    try:
        while not stop.is_set():
            page = rng.choice(STREAMED)
            h.pwrite(STREAM_CONTENTS[rng.randrange(len(STREAM_CONTENTS))], page * PAGE_SIZE)
            done += 1
            if done == 200:
                started.set()
    except nbd.Error:
        pass  # the server was killed under us
    finally:
        started.set()


def test_sigkill_during_writes_keeps_flushed_data_and_a_clean_store(
    nbd_server: ServerFactory,
) -> None:
    server = nbd_server(8 << 20)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for page in FLUSHED:
        h.pwrite(flushed_content(page), page * PAGE_SIZE)
    h.flush()
    h.shutdown()
    started, stop = threading.Event(), threading.Event()
    writer = threading.Thread(target=stream, args=(server.uri, started, stop))
    writer.start()
    try:
        assert started.wait(timeout=120)
        server.kill()
    finally:
        stop.set()
        writer.join()
    server.start()
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for page in FLUSHED:
        assert h.pread(PAGE_SIZE, page * PAGE_SIZE) == flushed_content(page), f"page {page}"
    allowed = {bytes(PAGE_SIZE), *STREAM_CONTENTS}
    for page in STREAMED:
        data = bytes(h.pread(PAGE_SIZE, page * PAGE_SIZE))
        assert data in allowed, f"page {page} holds neither its old nor a written content"
    h.shutdown()
    assert server.stop() == 0
    assert_clean(server.store)
