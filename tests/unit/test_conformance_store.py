"""The block-device conformance suite against the store in-process, and the suite's own power to
fail: a device that trims one page too many must not pass it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dedupblk.device import BlockDevice
from dedupblk.ramdisk import RamDisk
from dedupblk.store import check_store, create_store, open_store
from tests.conformance import CHECKS, MIN_SIZE, PAGE, check_random_mix, check_trim_and_zero


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(tmp_path: Path, check: Callable[[BlockDevice], None]) -> None:
    path = str(tmp_path / "s")
    create_store(path, MIN_SIZE)
    with open_store(path) as store:
        check(store)
        store.commit()
        check(store) if check.__name__ == "check_starts_zero" else None
    assert check_store(path).problems == []


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_ram_disk_conforms(check: Callable[[BlockDevice], None]) -> None:
    check(RamDisk(MIN_SIZE))


class TrimsOnePageTooMany(RamDisk):
    """A broken translation: every trim also zeroes the page after its range."""

    block_size = PAGE

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        super().trim(offset, min(self.size - offset, length + PAGE))


@pytest.mark.parametrize("check", [check_trim_and_zero, check_random_mix], ids=lambda c: c.__name__)
def test_the_suite_fails_a_device_that_trims_too_much(check: Callable[[BlockDevice], None]) -> None:
    with pytest.raises(AssertionError, match="byte"):
        check(TrimsOnePageTooMany(MIN_SIZE))
