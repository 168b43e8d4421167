"""Slots on a block device (``create --backend /dev/...``), here a loop device over a sparse file:
I/O is O_DIRECT, data survives reopening, a full device is ENOSPC with nothing lost, and freed
slots are discarded (the loop driver punches its file)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dedupblk.store import BackendMismatch, StoreFull, check_store, create_store, open_store
from dedupblk.store.store import read_statistics
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
