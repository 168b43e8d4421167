"""Exact accounting over the wire: a known mix written with libnbd, counted by the store."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import nbd
import pytest

from .nbd_helpers import PAGE_SIZE, ServerFactory, run

pytestmark = pytest.mark.nbd


def word_page(word: int) -> bytes:
    return word.to_bytes(8, "little") * (PAGE_SIZE // 8)


def test_stored_same_filled_and_mapped_pages_are_exact(nbd_server: ServerFactory) -> None:
    server = nbd_server(4 << 20)
    rng = random.Random(11)
    contents = [rng.randbytes(PAGE_SIZE) for _ in range(5)]
    h = nbd.NBD()
    h.connect_uri(server.uri)

    def put(page: int, data: bytes) -> None:
        h.pwrite(data, page * PAGE_SIZE)

    # Pages 0-39: the five contents, eight times each (one 160 KiB request, then per page).
    h.pwrite(b"".join(contents[i % 5] for i in range(20)), 0)
    for page in range(20, 40):
        put(page, contents[page % 5])
    # Pages 40-49: zeros written as data; 50-54 zeroed with NBD_CMD_WRITE_ZEROES.
    h.pwrite(bytes(10 * PAGE_SIZE), 40 * PAGE_SIZE)
    h.zero(5 * PAGE_SIZE, 50 * PAGE_SIZE)
    # Pages 60-69: one byte repeated; 70-74: one 8-byte word repeated; 75: another word.
    h.pwrite(b"\xab" * (10 * PAGE_SIZE), 60 * PAGE_SIZE)
    for page in range(70, 75):
        put(page, word_page(0x0123456789ABCDEF))
    put(75, word_page(42))
    # Overwrites: 0-4 with content 4 (content 0 lives on in 5, 10, ...); 60-61 with zeros;
    # 70 with new data that appears nowhere else.
    h.pwrite(contents[4] * 5, 0)
    h.zero(2 * PAGE_SIZE, 60 * PAGE_SIZE)
    put(70, rng.randbytes(PAGE_SIZE))
    # Trims: 35-39 (data) and 74-75 (same-filled).
    h.trim(5 * PAGE_SIZE, 35 * PAGE_SIZE)
    h.trim(2 * PAGE_SIZE, 74 * PAGE_SIZE)
    h.flush()
    h.shutdown()
    assert server.stop() == 0
    # As an operator sees it: `dedupblk check` exits 0, `dedupblk stats --json`.
    cli = str(Path(sys.executable).with_name("dedupblk"))
    run(cli, "check", str(server.store))
    stats = json.loads(run(cli, "stats", str(server.store), "--json").stdout)
    # Data pages: 0-34 (35 pages, five contents) and 70 (one more content).
    # Same-filled: 62-69 (8 pages of 0xab) and 71-73 (3 pages of the word).
    assert stats["mapped_pages"] == 36
    assert stats["stored_pages"] == 6
    assert stats["same_filled_pages"] == 11
