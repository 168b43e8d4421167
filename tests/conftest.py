"""Fixtures shared by every tier: small stores, so small data reaches the edges."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dedupblk.store import Store, create_store, open_store

REPO = Path(__file__).resolve().parent.parent
SMALL = 1 << 20  # 256 pages


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runtime directory of the test's own (`dedupblk.served.registry_dir`): servers it
    starts, in this process or a child, write their records and counters files there, not in the
    machine's."""
    directory = tmp_path_factory.mktemp("runtime")
    directory.chmod(0o700)
    monkeypatch.setenv("DEDUPBLK_RUNTIME_DIR", str(directory))
    return directory


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


def _need_root_and(tool: str, what: str) -> None:
    if os.geteuid() != 0 or shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root with {tool}: {what} must be tested")
        pytest.skip(f"needs root and {tool}")


@pytest.fixture
def make_loop_device(tmp_path: Path) -> Iterator[Callable[[int], tuple[str, Path]]]:
    """``make_loop_device(pages)``: a loop device over a new sparse file of that many pages (its
    path and the file's), detached afterwards."""
    _need_root_and("losetup", "the block backend")
    made: list[str] = []

    def make(pages: int) -> tuple[str, Path]:
        image = tmp_path / f"device-{len(made)}.img"
        with image.open("wb") as f:
            f.truncate(pages * 4096)
        done = subprocess.run(["losetup", "--find", "--show", str(image)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"losetup: {done.stderr}")
            pytest.skip(f"no loop device here: {done.stderr.strip()}")
        made.append(done.stdout.strip())
        return made[-1], image

    yield make
    for device in made:
        subprocess.run(["losetup", "--detach", device], check=True)


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], tuple[str, Path]]) -> tuple[str, Path]:
    """A loop device over a sparse 41-page file: the backend header and 40 slots."""
    return make_loop_device(41)


@pytest.fixture
def zram_device() -> Iterator[str]:
    """A fresh 1 MiB zram device (hot-added, removed afterwards): a block device that is not a
    loop over a file."""
    control = Path("/sys/class/zram-control")
    if os.geteuid() != 0 or not control.exists():
        if os.environ.get("CI"):
            pytest.fail("CI runs as root on a kernel with zram: the placement must be tested")
        pytest.skip("needs root and zram")
    number = (control / "hot_add").read_text().strip()
    try:
        Path(f"/sys/block/zram{number}/disksize").write_text("1M\n")
        yield f"/dev/zram{number}"
    finally:
        Path(f"/sys/block/zram{number}/reset").write_text("1\n")
        (control / "hot_remove").write_text(f"{number}\n")
