"""Whose is a backend? `create` takes a file or block device for the slots only when nothing of
anyone else's is on it: a new file, an empty one, or another dedupblk store's slots (with
``reuse_backend``). Everything else is refused, naming what was found, unless the caller says in
words that it may be destroyed (``overwrite``):

- a path inside a store directory (another store's metadata, lock or slots file);
- a block device that is mounted or held open exclusively by anyone (``O_EXCL`` fails);
- anything ``blkid -p`` (util-linux's low-level probe) recognises: a filesystem, a partition
  table, swap, an LVM or RAID member;
- any other existing file with data in it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

from ..errors import BackendMismatch, StoreError
from .format import BACKEND_HEADER, BACKEND_MAGIC, HEADER_SLOT, META_DIR, PAGE_SIZE

BLKID_NOTHING_FOUND = 2  # blkid's exit status when the device holds no known signature


def holds_dedupblk_slots(path: str) -> bool:
    """Whether ``path`` starts with a dedupblk backend header."""
    try:
        with open(path, "rb") as f:
            f.seek(HEADER_SLOT * PAGE_SIZE)
            return f.read(BACKEND_HEADER.size).startswith(BACKEND_MAGIC)
    except OSError:
        return False


def enclosing_store(path: str) -> str | None:
    """The store directory ``path`` lies in (a directory with ``meta/data.mdb``), if any."""
    directory = os.path.dirname(os.path.realpath(path))
    while True:
        if os.path.isfile(os.path.join(directory, META_DIR, "data.mdb")):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def probe_signatures(path: str) -> str | None:
    """What ``blkid -p`` finds on ``path`` (e.g. "an ext4 filesystem"), or None."""
    blkid = shutil.which("blkid") or "/sbin/blkid"
    try:
        done = subprocess.run(
            [blkid, "-p", "-o", "export", path], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise StoreError(f"cannot run blkid to probe {path}: {exc.strerror}") from exc
    if done.returncode == BLKID_NOTHING_FOUND:
        return None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        raise StoreError(f"cannot probe {path} for existing data (blkid: {reason})")
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if "PTTYPE" in found and "TYPE" not in found:
        return f"a {found['PTTYPE']} partition table"
    kind = found.get("TYPE", "unknown")
    usage = found.get("USAGE", "")
    named = {"swap": "swap space", "LVM2_member": "an LVM physical volume"}
    if kind in named:
        return named[kind]
    if usage == "filesystem":
        return f"an {kind} filesystem" if kind[:1] in "aeiou" else f"a {kind} filesystem"
    return f"a {kind} signature" + (f" ({usage})" if usage else "")


def _held_exclusively(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
    os.close(fd)
    return False


def refuse_foreign_backend(path: str, *, reuse: bool, overwrite: bool) -> None:
    """Raise `BackendMismatch` naming what ``path`` holds, unless it is free to take (see the
    module docstring). A path that does not exist yet is free."""
    if not os.path.lexists(path):
        return
    store = enclosing_store(path)
    if store is not None:
        raise BackendMismatch(f"backend {path} lies inside the store {store}: never a backend")
    info = os.stat(path)
    is_block = stat.S_ISBLK(info.st_mode)
    if not is_block and not stat.S_ISREG(info.st_mode):
        raise BackendMismatch(f"backend {path} is neither a regular file nor a block device")
    if is_block and _held_exclusively(path):
        raise BackendMismatch(
            f"backend {path} is mounted or held open exclusively by another program"
        )
    if holds_dedupblk_slots(path):
        if reuse or overwrite:
            return
        raise BackendMismatch(
            f"backend {path} already holds the slots of a dedupblk store: give "
            "--reuse-backend to abandon them for a new store"
        )
    if overwrite:
        return
    found = probe_signatures(path)
    if found is not None:
        raise BackendMismatch(
            f"backend {path} holds {found}: give --overwrite-backend to destroy it"
        )
    if not is_block and info.st_size > 0:
        raise BackendMismatch(
            f"backend {path} is an existing file of {info.st_size} bytes that is not dedupblk "
            "slots: give --overwrite-backend to destroy it"
        )
