"""The block-device conformance suite against the store in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dedupblk.store import Store, check_store, create_store, open_store
from tests.conformance import CHECKS, MIN_SIZE, BlockDevice


class StoreDevice:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.size = store.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.store.read(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.store.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self.store.trim(offset, length)

    def zero(self, offset: int, length: int) -> None:
        self.store.write_zeroes(offset, length)

    def flush(self) -> None:
        self.store.flush()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(tmp_path: Path, check: Callable[[BlockDevice], None]) -> None:
    path = str(tmp_path / "s")
    create_store(path, MIN_SIZE)
    with open_store(path) as store:
        check(StoreDevice(store))
        store.commit()
        check(StoreDevice(store)) if check.__name__ == "check_starts_zero" else None
    assert check_store(path).problems == []
