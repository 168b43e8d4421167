"""Fixtures shared by every tier: small stores, so small data reaches the edges."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.store import Store, create_store, open_store

REPO = Path(__file__).resolve().parent.parent
SMALL = 1 << 20  # 256 pages


@pytest.fixture
def store_dir(tmp_path: Path) -> str:
    """A fresh 1 MiB store (256 pages, sparse data file with headroom)."""
    path = str(tmp_path / "store")
    create_store(path, SMALL)
    return path


@pytest.fixture
def store(store_dir: str) -> Iterator[Store]:
    with open_store(store_dir) as opened:
        yield opened


def pages_of(*contents: bytes) -> bytes:
    return b"".join(contents)


def rand_page(seed: int) -> bytes:
    import random  # noqa: PLC0415

    return random.Random(seed).randbytes(4096)


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512
