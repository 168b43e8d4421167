"""The VM harness's disks: the ext4 scratch disk first (/dev/vda), the raw disk after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.vm import Harness, KernelImage, VMError


def _make() -> Harness:
    return Harness(kernel=None, initramfs=Path("/nonexistent"))  # type: ignore[arg-type]


def _drives(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]


def test_the_raw_disk_follows_the_scratch_disk() -> None:
    vm = Harness(kernel=KernelImage(release="6.12.0", root=Path("/k")), initramfs=Path("/i"))
    argv = vm.qemu_argv(Path("/share"), Path("/w/scratch.img"), 768, None, Path("/w/raw.img"))
    drives = _drives(argv)
    assert [d.split(",")[0] for d in drives] == ["file=/w/scratch.img", "file=/w/raw.img"]
    assert all("if=virtio" in d and "format=raw" in d for d in drives)
    assert _drives(vm.qemu_argv(Path("/share"), Path("/w/scratch.img"), 768)) == drives[:1]


def test_a_raw_disk_needs_the_scratch_disk() -> None:
    with pytest.raises(VMError, match="needs the scratch disk"):
        _make().run("true", scratch_mb=0, raw_disk_mb=64)
