"""Where a swap store's files may live, and the tools that make a device swap.

`check_placement` refuses a store that could need the device it backs to be read, and warns
about a placement that can stall under memory pressure; the reasons and the runs behind them are
in docs/swap.md.  `swap_on` and `swap_off` run mkswap, swapon and swapoff (blk-wbt off first).
Paths and flags come in plain: this module knows nothing of the store.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess

from ..errors import InvalidRequest, UblkError
from ..fsinfo import RAMFS_MAGIC, TMPFS_MAGIC, filesystem_type

log = logging.getLogger(__name__)


def check_placement(
    metadata: str,
    slots: str,
    *,
    slots_preallocated: bool,
    swap: bool,
    serving_dev_id: int | None,
    may_hang: bool = False,
) -> None:
    """Refuse to serve a store whose files could need the device being served to be read.

    ``metadata`` is the store's directory, ``slots`` its backend (a file or a block device).

    - Never on the ublk device being served (``--recover N`` of the device the store is on).
    - With swap: never on tmpfs (its pages can be swapped out to this device) and never on any
      ublk device (a stacked server could itself be waiting for this one).
    - With swap, unless ``may_hang`` accepts the risk: neither the metadata on a disk filesystem
      (anything but ramfs) nor the slots in a file on one. Both were measured to hang the machine
      under memory pressure (see "Swap placement" in docs/swap.md).
    - With swap, warnings for what else can stall under memory pressure (a loop device; with
      ``may_hang``, what makes the accepted placement worse).
    """
    for path in sorted({metadata, slots}):
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
        if swap and not is_device and filesystem_type(path) == TMPFS_MAGIC:
            raise InvalidRequest(
                f"{path} is on tmpfs, which can be swapped out to the swap device it backs: "
                "put a swap store's directory on ramfs and its slots on a block device (or in a "
                "preallocated file on a disk)"
            )
        disks = ublk_disks_under(path)
        if serving_dev_id is not None and f"ublkb{serving_dev_id}" in disks:
            raise InvalidRequest(f"{path} lives on /dev/ublkb{serving_dev_id}, the device served")
        if swap and disks:
            raise InvalidRequest(
                f"{path} lives on ublk device(s) {', '.join(sorted(disks))}: a swap store must "
                "not depend on another userspace server"
            )
    if swap and not may_hang:
        _refuse_swap_placement_that_may_hang(metadata, slots)
    if swap:
        _warn_swap_placement(metadata, slots, slots_preallocated=slots_preallocated)


def _refuse_swap_placement_that_may_hang(metadata: str, slots: str) -> None:
    """The two placements measured to hang: metadata on a disk, slots in a file on a disk."""
    accept = "or accept the risk with --swap-placement-may-hang"
    if filesystem_type(metadata) != RAMFS_MAGIC:
        raise InvalidRequest(
            f"{metadata} (the store's metadata) is not on ramfs: under memory pressure, writing "
            "back its dirty pages can hang this swap device; create the store on ramfs "
            f'(README, "Running as swap"), {accept}'
        )
    if not stat.S_ISBLK(os.stat(slots).st_mode) and filesystem_type(slots) != RAMFS_MAGIC:
        raise InvalidRequest(
            f"{slots} (the slots) is a file on a disk filesystem: its O_DIRECT I/O takes its bios "
            "from the pool swap-outs take theirs from and can hang this swap device (3 runs in "
            "59 did); put the slots on a block device (a partition, an LV, zram), "
            f"{accept}"
        )


def _warn_swap_placement(metadata: str, slots: str, *, slots_preallocated: bool) -> None:
    """Log what in a swap store's placement can wait on memory (docs/swap.md)."""
    if filesystem_type(metadata) != RAMFS_MAGIC:
        log.warning(
            "%s (the store's metadata) is not on ramfs: under memory pressure, writing back its "
            'dirty pages can stall this swap device (see README, "Running as swap")',
            metadata,
        )
        if not mounted_with(metadata, "lazytime"):
            log.warning("%s is not mounted lazytime: every timestamp update of the store's "
                        "metadata goes through its journal", metadata)  # fmt: skip
    backing = loop_backing_file(slots)
    if backing is not None:
        log.warning("%s (the slots) is a loop device over %s: its I/O goes through that file, "
                    "as a slot file's does (see README, \"Running as swap\")",
                    slots, backing)  # fmt: skip
    if not stat.S_ISBLK(os.stat(slots).st_mode) and filesystem_type(slots) != RAMFS_MAGIC:
        log.warning("%s (the slots) is a file on a disk filesystem: its O_DIRECT I/O takes its "
                    "bios from the pool the kernel's swap-outs take theirs from, which can run "
                    "dry with swap-outs queued on this device; put the slots on a block device "
                    "(a partition, an LV, zram)", slots)  # fmt: skip
        if not slots_preallocated:
            log.warning("%s (the slots) was not created with --preallocate: a slot write "
                        "can need a new file block under memory pressure", slots)  # fmt: skip
        if not mounted_with(slots, "lazytime"):
            log.warning("%s is not mounted lazytime: a slot write's timestamp update goes "
                        "through its journal", slots)  # fmt: skip


def _disk_names(major: int, minor: int) -> set[str]:
    """The block device major:minor, its whole disk if it is a partition, and every device it is
    stacked on (``slaves``), by kernel name."""
    names: set[str] = set()
    todo = [os.path.realpath(f"/sys/dev/block/{major}:{minor}")]
    while todo:
        node = todo.pop()
        if not os.path.isdir(node) or os.path.basename(node) in names:
            continue
        names.add(os.path.basename(node))
        if os.path.exists(os.path.join(node, "partition")):
            todo.append(os.path.dirname(node))
        slaves = os.path.join(node, "slaves")
        if os.path.isdir(slaves):
            todo.extend(os.path.realpath(os.path.join(slaves, s)) for s in os.listdir(slaves))
    return names


def ublk_disks_under(path: str) -> set[str]:
    """Names of the ublk disks (``ublkbN``) that ``path`` lives on: the device itself for a block
    device, otherwise the device holding its filesystem (and what that is stacked on)."""
    st = os.stat(path)
    device = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    if os.major(device) == 0:  # a virtual filesystem (tmpfs, 9p, btrfs subvolume ids...)
        return set()
    return {n for n in _disk_names(os.major(device), os.minor(device)) if n.startswith("ublkb")}


def loop_backing_file(path: str) -> str | None:
    """The file behind ``path`` if it is a loop device, else None."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
    try:
        with open(sysfs) as backing:
            return backing.read().strip()
    except OSError:
        return None


def mounted_with(path: str, option: str) -> bool:
    """Whether the mount holding ``path`` (the longest mount point above it) has ``option``
    among its mount or super options (mountinfo fields 6 and after the " - " separator)."""
    real, best, options = os.path.realpath(path), "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            line = line.rstrip("\n")  # noqa: PLW2901
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            under = real == point or real.startswith(point.rstrip("/") + "/")
            if under and len(point) >= len(best):
                best, options = point, f"{fields[5]},{line.split(' - ', 1)[-1]}"
    return option in options.replace(" ", ",").split(",")


# -- the swap tools -----------------------------------------------------------------------------


def swap_on(path: str, *, priority: int | None, discard: bool) -> None:
    """Writeback throttling off, then ``mkswap`` and ``swapon`` on the block device ``path``."""
    disable_writeback_throttling(path)
    run_tool(["mkswap", path])
    command = ["swapon"]
    if priority is not None:
        command += ["-p", str(priority)]
    if discard:
        command.append("--discard")
    run_tool([*command, path])
    log.info("swap enabled on %s", path)


def swap_off(path: str) -> None:
    """``swapoff``: it reads every swapped page back, so the device must still be served."""
    run_tool(["swapoff", path])


def is_active_swap(path: str) -> bool:
    """Whether ``path`` is in /proc/swaps (swapped on by anyone)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/swaps") as swaps:
            next(swaps, None)  # header
            return any(os.path.realpath(line.split()[0]) == real for line in swaps if line.strip())
    except OSError:
        return False


def disable_writeback_throttling(path: str) -> None:
    """Turn the block layer's writeback throttling (blk-wbt) off for a swap device.

    wbt shrinks the number of buffered writes in flight whenever completions take longer than its
    target (2 ms on a non-rotational queue), down to one. A userspace server's latency is above
    that target, so under memory pressure reclaim's swap-outs (buffered writes, throttled; kswapd
    included) would go to the device one at a time while everything waits for memory. zram, a
    bio-based driver, has no wbt at all.
    """
    knob = f"/sys/block/{os.path.basename(path)}/queue/wbt_lat_usec"
    try:
        with open(knob, "w") as f:
            f.write("0\n")
    except FileNotFoundError:
        return  # a kernel built without CONFIG_BLK_WBT
    except OSError as exc:
        log.warning("cannot turn writeback throttling off on %s (%s)", path, exc.strerror)
        return
    log.info("writeback throttling off on %s", path)


def run_tool(command: list[str]) -> None:
    """Run a command; `UblkError` with the last line it printed if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UblkError(f"cannot run {command[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise UblkError(
            f"{' '.join(command)} failed (exit {done.returncode})"
            + (f": {message[-1]}" if message else "")
        )
