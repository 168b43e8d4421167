"""Slots on a block device (``create --backend /dev/...``), here a loop device over a sparse file:
I/O is O_DIRECT, data survives reopening, a full device is ENOSPC with nothing lost, and freed
slots are discarded (the loop driver punches its file)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dedupblk.store import BackendMismatch, StoreFull, check_store, create_store, open_store
from dedupblk.store.backend import BLOCK_DIO_MAX_PAGES, Backend
from dedupblk.store.stats import read_statistics
from tests.conftest import SMALL, allocated_bytes, rand_page

P = 4096


@pytest.fixture
def block_store(tmp_path: Path, loop_device: tuple[str, Path]) -> tuple[str, Path]:
    """A new store whose slots are the loop device; its path and the device's backing file."""
    device, image = loop_device
    path = str(tmp_path / "s")
    create_store(path, SMALL, backend=device)
    return path, image


def test_pages_on_a_block_device_survive_reopening(block_store: tuple[str, Path]) -> None:
    path, _ = block_store
    pages = [rand_page(n % 12) for n in range(24)]  # 12 unique pages, each twice
    with open_store(path) as store:
        assert store._backend.is_block and store._backend.direct
        store.write(0, b"".join(pages))
        store.flush()
        assert store.statistics().stored_pages == 12
    with open_store(path) as store:
        assert [store.read(n * P, P) for n in range(24)] == pages
    assert check_store(path).problems == []


def test_a_full_block_device_is_enospc_and_keeps_what_it_holds(
    block_store: tuple[str, Path],
) -> None:
    path, _ = block_store
    with open_store(path) as store:
        for n in range(40):
            store.write(n * P, rand_page(100 + n))
        with pytest.raises(StoreFull) as info:
            store.write(40 * P, rand_page(140))
        assert info.value.errno == errno.ENOSPC
        store.write(41 * P, rand_page(100))  # a duplicate still fits
        assert [store.read(n * P, P) for n in range(40)] == [rand_page(100 + n) for n in range(40)]
    assert check_store(path).problems == []


def test_freed_slots_are_discarded_on_the_device(block_store: tuple[str, Path]) -> None:
    path, image = block_store
    with open_store(path) as store:
        store.write(0, b"".join(rand_page(200 + n) for n in range(32)))
        store.flush()
        full = allocated_bytes(str(image))
        store.trim(0, 32 * P)
        store.flush()
    assert read_statistics(path)[1].stored_pages == 0
    assert allocated_bytes(str(image)) <= full - 28 * P


def test_a_block_device_holding_another_store_is_refused(
    tmp_path: Path, loop_device: tuple[str, Path]
) -> None:
    device, _ = loop_device
    create_store(str(tmp_path / "one"), SMALL, backend=device)
    with open_store(str(tmp_path / "one")) as store:
        store.write(0, rand_page(7))
    with pytest.raises(BackendMismatch, match="already holds the slots of a dedupblk store"):
        create_store(str(tmp_path / "two"), SMALL, backend=device)
    assert not (tmp_path / "two").exists()
    with open_store(str(tmp_path / "one")) as store:  # still the first store's, intact
        assert store.read(0, P) == rand_page(7)


def test_a_long_run_of_slots_is_written_in_bio_sized_pieces(
    make_loop_device: Callable[[int], tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past BLOCK_DIO_MAX_PAGES pages, an O_DIRECT write to a block device takes bios from the
    # pool swap-outs use; a longer run of consecutive slots is cut into writes of at most that.
    device, _ = make_loop_device(1 + 600)
    backend = Backend.create(device, None, b"u" * 16)
    backend.check_header(b"u" * 16)  # as a store opens it: O_DIRECT from here on
    sizes: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data) // P)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    pages = {slot: rand_page(slot) for slot in range(1, 601)}
    try:
        assert backend.is_block and backend.direct
        backend.write_slots(list(pages.items()))
        assert sizes == [BLOCK_DIO_MAX_PAGES, BLOCK_DIO_MAX_PAGES, 600 - 2 * BLOCK_DIO_MAX_PAGES]
        assert all(backend.read_slot(slot) == page for slot, page in pages.items())
    finally:
        backend.close()
