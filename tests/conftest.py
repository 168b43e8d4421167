"""Fixtures shared by every tier: small stores, so small data reaches the edges."""

from __future__ import annotations

import os
import shutil
import subprocess
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


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a sparse 41-page file: the backend header and 40 slots."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with losetup: the block backend must be tested")
        pytest.skip("needs root and losetup for a loop device")
    image = tmp_path / "device.img"
    with image.open("wb") as f:
        f.truncate(41 * 4096)
    done = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"losetup: {done.stderr}")
        pytest.skip(f"no loop device here: {done.stderr.strip()}")
    device = done.stdout.strip()
    try:
        yield device, image
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
