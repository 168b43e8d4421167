"""`check_placement` for a swap store: tmpfs refused; metadata on ramfs and preallocated slots
on a disk accepted silently only when nothing in the placement writes back through page cache."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.frontends.ublk import _mounted_with, check_placement
from dedupblk.store import InvalidRequest, create_store, open_store

SIZE = 1 << 20


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[object]:
    """``mount(fstype, options)``: a fresh filesystem under tmp_path, unmounted afterwards."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the placement checks must be tested")
        pytest.skip("mounting ramfs and tmpfs needs root")
    mounted: list[Path] = []

    def make(fstype: str, options: str = "defaults") -> Path:
        point = tmp_path / f"{fstype}-{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


def test_a_swap_store_on_tmpfs_is_refused(mount: object) -> None:
    tmpfs = mount("tmpfs")  # type: ignore[operator]
    create_store(str(tmpfs / "s"), SIZE)
    with open_store(str(tmpfs / "s")) as store, pytest.raises(InvalidRequest, match="tmpfs"):
        check_placement(store, swap=True, serving_dev_id=None)


def test_metadata_on_ramfs_and_preallocated_slots_on_a_lazytime_disk_pass_silently(
    mount: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mount("ramfs")  # type: ignore[operator]
    slots = tmp_path / "slots"
    create_store(
        str(ramfs / "s"), SIZE, backend=str(slots), backend_size=SIZE + 8192, preallocate=True
    )
    lazy = _mounted_with(str(slots), "lazytime")
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None)
    warned = [r.getMessage() for r in caplog.records]
    assert not any("not on ramfs" in w or "--preallocate" in w for w in warned), warned
    assert any("not mounted lazytime" in w for w in warned) == (not lazy)


def test_metadata_on_a_disk_and_sparse_slots_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_store(str(tmp_path / "s"), SIZE)
    with open_store(str(tmp_path / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None)
        warned = " | ".join(r.getMessage() for r in caplog.records)
        assert "is not on ramfs" in warned
        assert "not created with --preallocate" in warned
        caplog.clear()
        check_placement(store, swap=False, serving_dev_id=None)  # not swap: no placement advice
        assert caplog.records == []


def test_mount_options_are_matched_whole(mount: object) -> None:
    ramfs = mount("ramfs", "mode=700")  # type: ignore[operator]
    assert _mounted_with(str(ramfs), "mode=700")
    assert not _mounted_with(str(ramfs), "mode")
    assert not _mounted_with(str(ramfs), "lazytime")
