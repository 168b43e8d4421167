"""`check_placement` for a swap store: tmpfs refused; metadata on ramfs and slots on a block
device accepted silently; the two placements measured to hang (slots in a file on a disk, whose
O_DIRECT bios come from the pool swap-outs use, and metadata on a disk) refused unless the risk
is accepted in words, and then warned about, more so when they can write back through page cache
or journal."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.store import InvalidRequest, Store, create_store, open_store
from dedupblk.ublk.placement import check_placement as check_paths
from dedupblk.ublk.placement import mounted_with

SIZE = 1 << 20


def check_placement(
    store: Store, *, swap: bool, serving_dev_id: int | None, may_hang: bool = False
) -> None:
    """The placement check `serve` makes, on an opened store's files."""
    check_paths(
        store.path,
        store.backend_path,
        slots_preallocated=store.backend_preallocated,
        swap=swap,
        serving_dev_id=serving_dev_id,
        may_hang=may_hang,
    )


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
        source = fstype
        if fstype == "ext4":  # a small ext4 image on a loop device
            source = str(tmp_path / f"ext4-{len(mounted)}.img")
            with open(source, "wb") as image:
                image.truncate(16 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", source], check=True)
            options += ",loop"
        subprocess.run(["mount", "-t", fstype, "-o", options, source, str(point)], check=True)
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


def test_metadata_on_ramfs_and_slots_on_a_block_device_pass_silently(
    mount: object, zram_device: str, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mount("ramfs")  # type: ignore[operator]
    create_store(str(ramfs / "s"), SIZE, backend=zram_device, preallocate=True)
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None)
    assert caplog.records == []


def test_slots_on_a_loop_device_are_warned_about(
    mount: object, loop_device: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # a loop device's I/O is its backing file's: the slot file's bio pool, by another path
    ramfs = mount("ramfs")  # type: ignore[operator]
    device, image = loop_device
    create_store(str(ramfs / "s"), SIZE, backend=device)
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert f"is a loop device over {image}" in warned[0]


def test_slots_in_a_file_on_a_disk_are_refused_unless_the_risk_is_accepted(
    mount: object, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mount("ramfs")  # type: ignore[operator]
    disk = mount("ext4", "lazytime")  # type: ignore[operator]
    create_store(str(ramfs / "s"), SIZE, backend=str(disk / "slots"), preallocate=True)
    with open_store(str(ramfs / "s")) as store:
        with pytest.raises(InvalidRequest, match="file on a disk filesystem") as refused:
            check_placement(store, swap=True, serving_dev_id=None)
        assert str(disk / "slots") in str(refused.value)
        assert "--swap-placement-may-hang" in str(refused.value)
        check_placement(store, swap=False, serving_dev_id=None)  # not swap: no hang to fear
        with caplog.at_level(logging.WARNING):
            check_placement(store, swap=True, serving_dev_id=None, may_hang=True)
    assert len(caplog.records) == 1  # the risk accepted is still named


def test_metadata_on_a_disk_is_refused_unless_the_risk_is_accepted(
    mount: object, zram_device: str
) -> None:
    disk = mount("ext4", "lazytime")  # type: ignore[operator]
    create_store(str(disk / "s"), SIZE, backend=zram_device, preallocate=True)  # slots: fine
    with open_store(str(disk / "s")) as store:
        with pytest.raises(InvalidRequest, match=r"metadata\) is not on ramfs") as refused:
            check_placement(store, swap=True, serving_dev_id=None)
        assert "--swap-placement-may-hang" in str(refused.value)
        check_placement(store, swap=True, serving_dev_id=None, may_hang=True)


def test_a_tmpfs_store_is_refused_even_with_the_risk_accepted(mount: object) -> None:
    tmpfs = mount("tmpfs")  # type: ignore[operator]
    create_store(str(tmpfs / "s"), SIZE)
    with open_store(str(tmpfs / "s")) as store, pytest.raises(InvalidRequest, match="tmpfs"):
        check_placement(store, swap=True, serving_dev_id=None, may_hang=True)


def test_preallocated_slots_on_a_lazytime_disk_get_the_bio_pool_warning_only(
    mount: object, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mount("ramfs")  # type: ignore[operator]
    disk = mount("ext4", "lazytime")  # type: ignore[operator]
    create_store(str(ramfs / "s"), SIZE, backend=str(disk / "slots"), preallocate=True)
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None, may_hang=True)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert str(disk / "slots") in warned[0] and "file on a disk filesystem" in warned[0]


def test_slots_on_a_disk_without_lazytime_are_warned_about(
    mount: object, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mount("ramfs")  # type: ignore[operator]
    disk = mount("ext4")  # type: ignore[operator]
    create_store(str(ramfs / "s"), SIZE, backend=str(disk / "slots"), preallocate=True)
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None, may_hang=True)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert "file on a disk filesystem" in warned[0]
    assert str(disk / "slots") in warned[1] and "not mounted lazytime" in warned[1]


def test_metadata_on_a_disk_and_sparse_slots_are_warned_about(
    mount: object, caplog: pytest.LogCaptureFixture
) -> None:
    disk = mount("ext4", "lazytime")  # type: ignore[operator]
    create_store(str(disk / "s"), SIZE)
    with open_store(str(disk / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None, may_hang=True)
        warned = " | ".join(r.getMessage() for r in caplog.records)
        assert "is not on ramfs" in warned
        assert "not created with --preallocate" in warned
        assert "lazytime" not in warned
        caplog.clear()
        check_placement(store, swap=False, serving_dev_id=None)  # not swap: no placement advice
        assert caplog.records == []


def test_mount_options_are_matched_whole(mount: object) -> None:
    ramfs = mount("ramfs", "mode=700")  # type: ignore[operator]
    assert mounted_with(str(ramfs), "mode=700")
    assert not mounted_with(str(ramfs), "mode")
    assert not mounted_with(str(ramfs), "lazytime")


def test_preallocated_metadata_on_ramfs_is_written_at_create(mount: object) -> None:
    # ramfs reports no holes (SEEK_HOLE is the end of file) yet allocates a page on first write
    ramfs = mount("ramfs")  # type: ignore[operator]
    disk = mount("ext4", "lazytime")  # type: ignore[operator]
    create_store(
        str(ramfs / "s"), SIZE, backend=str(disk / "slots"), preallocate=True, meta_size=2 << 20
    )
    data = os.stat(ramfs / "s" / "meta" / "data.mdb")
    assert data.st_size == 2 << 20
    assert data.st_blocks * 512 >= data.st_size


def test_a_store_wholly_on_ramfs_needs_no_placement_advice(
    mount: object, caplog: pytest.LogCaptureFixture
) -> None:
    # slots in RAM too (a dedup-only RAM swap): no writeback, no journal, nothing to warn about
    ramfs = mount("ramfs")  # type: ignore[operator]
    create_store(str(ramfs / "s"), SIZE)
    with open_store(str(ramfs / "s")) as store, caplog.at_level(logging.WARNING):
        check_placement(store, swap=True, serving_dev_id=None)
    assert caplog.records == []
