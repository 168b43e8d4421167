"""The ublk frontend against a real 6.12 kernel: two boots, each running a group of checks.

The checks themselves live in ``guest/ublk_checks.py`` (run inside the guest with the project's
venv); each prints ``ok: NAME`` or ``FAIL: NAME: why``.  Grouping keeps the number of boots (and
of server start-ups, several seconds each under TCG) small.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.vm import Harness

from .guest.ublk_checks import RAW_DISK_MB

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest" / "ublk_checks.py"
PYTHON = REPO / ".venv" / "bin" / "python"

BLOCK_CHECKS = [
    "serve prints the device and runs hardened",
    "systemd is told READY=1 once the device is ready",
    "dedupblk list shows the ublk server; devices --has-device finds it",
    "a failed serve leaves the running server, its device and record alone",
    "the conformance suite passes on the device",
    "the conformance suite fails a translation that trims one page too many",
    "fio random 4K writes verify (crc32c)",
    "clean stop removes the device and leaves a clean store",
    "fio verifies the same data after a restart",
    "ext4: files, fsck, remount, checksums",
    "blkdiscard lowers stored_pages",
    "SIGKILL then --recover resumes I/O on the same device",
    "devices --cleanup deletes a dead server's device",
    "dedupblk stop STORE stops the ublk server, which tells systemd STOPPING=1",
    "serve --metrics: request counters and store gauges match what was written",
    "stats shows the ublk server's counters",
]
SWAP_CHECKS = [
    "a swap store on tmpfs is refused",
    "serve --swap enables swap with the priority asked, wbt off",
    "a memory hog swaps to the device and gets every byte back",
    "dedup of swapped pages",
    "swap discards reach the store once the hog is gone",
    "stop: swapoff, device removed, store clean",
    "the preallocated store was never punched nor extended",
]


def run_group(vm: Harness, group: str, checks: list[str], **options: int) -> None:
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: run `make setup` first")
    result = vm.run(f"{PYTHON} {GUEST} {group}", **options)
    context = f"guest output:\n{result.output}\nconsole tail:\n{result.console[-4000:]}"
    passed = [line.removeprefix("ok: ") for line in result.output.splitlines()
              if line.startswith("ok: ")]  # fmt: skip
    assert passed == checks, context
    assert f"all {group} checks passed" in result.output, context
    assert result.returncode == 0, context


def test_block_device(vm: Harness) -> None:
    run_group(vm, "block", BLOCK_CHECKS, timeout=1800, scratch_mb=768)


def test_swap(vm: Harness) -> None:
    # The README's swap placement (metadata preallocated on ramfs, slots on a block device of
    # their own: the raw disk /dev/vdb), with the whole guest out of memory: the hog allocates
    # 1.5 x MemAvailable, no cgroup.
    run_group(vm, "swap", SWAP_CHECKS, timeout=1200, memory_mb=768, scratch_mb=1024,
              raw_disk_mb=RAW_DISK_MB)  # fmt: skip
