"""Creating a store: its directory, backend header, LMDB records and, for swap, preallocation.

A failed create removes what it made and never touches an existing store (see `create_store`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid as uuidlib
from typing import Any

from ..errors import BackendMismatch, InvalidRequest, StoreError, StoreExists
from .backend import Backend, fill_holes, sync_file
from .claims import enclosing_store, refuse_foreign_backend
from .format import (
    DATA_FILE,
    DEFAULT_MAX_SHARE,
    DIR_MODE,
    FILE_MODE,
    FINGERPRINT_XXH3_128,
    FORMAT,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_PREALLOC,
    KEY_STATE,
    LOCK_FILE,
    MAX_SHARE,
    MAX_SLOTS,
    META_DIR,
    PAGE_SIZE,
    PREALLOC,
    Config,
    State,
    index_bucket_bits,
)
from .meta import Meta

META_PREALLOC_PER_PAGE = 48  # bytes of data.mdb preallocated per page of the device
META_PREALLOC_MIN = 1 << 20
MAX_DEVICE_BYTES = (1 << 63) - PAGE_SIZE  # sizes are signed 64-bit to the kernel and to NBD


def create_store(
    path: str | os.PathLike[str],
    size: int,
    *,
    backend: str | None = None,
    backend_size: int | None = None,
    max_index_entries: int | None = None,
    max_share: int = DEFAULT_MAX_SHARE,
    preallocate: bool = False,
    meta_size: int | None = None,
    reuse_backend: bool = False,
    overwrite_backend: bool = False,
) -> None:
    """Create an empty store of ``size`` bytes at ``path`` (a new or empty directory).

    ``backend`` names a file or block device to hold the slots instead of ``path/slots``;
    ``backend_size`` sets the capacity of a new data file (default: the header slot, the device
    size and a quarter more; the file is sparse). If creation fails part-way, the partial
    directory is removed; an existing store is never touched.

    ``preallocate`` (for swap; see "Preallocated stores" in the format) writes every block of
    the store's files with zeros before returning: the data file in full (a block device
    backend needs nothing) and LMDB's ``data.mdb`` up to ``meta_size`` bytes (default
    `default_meta_size`), so that serving allocates no file block while the metadata fits.

    A backend that already holds a store's slots (its header says so) is refused, unless
    ``reuse_backend``: then its old contents are abandoned (every slot is free in the new store)
    and a preallocated file is adopted as it is, without writing it again. Anything else that
    may be someone's data is refused unless ``overwrite_backend`` (see `dedupblk.store.claims`).
    """
    store_dir = os.fspath(path)
    if size <= 0 or size % PAGE_SIZE or size > MAX_DEVICE_BYTES:
        raise InvalidRequest(
            f"bad size {size}: a positive multiple of {PAGE_SIZE}, at most {MAX_DEVICE_BYTES}"
        )
    if not 1 <= max_share <= MAX_SHARE:
        raise InvalidRequest(f"bad max-share {max_share}: 1 to {MAX_SHARE}")
    if max_index_entries is not None and not 1 <= max_index_entries <= MAX_SLOTS:
        raise InvalidRequest(f"bad max-index-entries {max_index_entries}: 1 to {MAX_SLOTS}")
    if backend_size is not None and backend_size > MAX_SLOTS * PAGE_SIZE:
        raise InvalidRequest(
            f"bad backend size {backend_size}: at most {MAX_SLOTS * PAGE_SIZE} ({MAX_SLOTS} slots)"
        )
    if backend_size is not None and (backend_size < 2 * PAGE_SIZE or backend_size % PAGE_SIZE):
        raise InvalidRequest(
            f"bad backend size {backend_size}: a multiple of {PAGE_SIZE}, at least two slots"
        )
    if meta_size is not None and not preallocate:
        raise InvalidRequest("a metadata size is only given with preallocation")
    if meta_size is not None and (meta_size < META_PREALLOC_MIN or meta_size % PAGE_SIZE):
        raise InvalidRequest(
            f"bad metadata size {meta_size}: a multiple of {PAGE_SIZE}, at least "
            f"{META_PREALLOC_MIN}"
        )
    backend_path = os.path.abspath(backend) if backend else ""
    inside = enclosing_store(os.path.join(os.path.abspath(store_dir), "x"))
    if inside is not None:
        raise StoreExists(f"{store_dir} lies inside the store {inside}")
    if backend_path:
        refuse_foreign_backend(backend_path, reuse=reuse_backend, overwrite=overwrite_backend)
    if os.path.lexists(store_dir):
        if os.path.islink(store_dir) or not os.path.isdir(store_dir):
            raise StoreExists(f"{store_dir} exists and is not a directory")
        if os.listdir(store_dir):
            raise StoreExists(f"{store_dir} exists and is not empty")
        made_dir = False
    else:
        parent = os.path.dirname(os.path.abspath(store_dir))
        if not os.path.isdir(parent):
            raise StoreError(f"cannot create {store_dir}: {parent} does not exist")
        try:
            os.mkdir(store_dir, DIR_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create {store_dir}: {exc.strerror}") from exc
        made_dir = True
    store_uuid = uuidlib.uuid4().bytes
    try:
        os.chmod(store_dir, DIR_MODE)
        data_path = backend_path or os.path.join(store_dir, DATA_FILE)
        capacity = backend_size
        made_backend = bool(backend_path) and not os.path.exists(backend_path)
        parent = os.path.realpath(os.path.dirname(backend_path)) if backend_path else ""
        if made_backend and (parent == "/dev" or parent.startswith("/dev/")):
            raise BackendMismatch(f"backend {backend_path} does not exist (no file made in /dev)")
        if capacity is None and not (backend_path and _is_block_device(backend_path)):
            # The data file is sparse, so headroom costs nothing: it lets overwrites take new slots
            # while the old ones wait for the next commit (see the format's write order), and
            # duplicates past max-share take slots of their own. An existing file
            # (--reuse-backend) grows to it too; it never shrinks.
            capacity = PAGE_SIZE + size + (size // 4) // PAGE_SIZE * PAGE_SIZE
        if capacity is not None and capacity > MAX_SLOTS * PAGE_SIZE:
            raise InvalidRequest(
                f"a backend of {capacity} bytes is more than {MAX_SLOTS} slots: give --backend-size"
            )
        slots = Backend.create(data_path, capacity, store_uuid, preallocate=preallocate)
        try:
            slot_capacity = min(MAX_SLOTS, slots.capacity_slots())
            slots.sync()
        finally:
            slots.close()
        if slot_capacity < 2:
            raise BackendMismatch(f"backend {data_path} holds no data slot")
        config = Config(
            size=size,
            page_size=PAGE_SIZE,
            slot_capacity=slot_capacity,
            max_index_entries=max_index_entries or 0,
            max_share=max_share,
            fingerprint=FINGERPRINT_XXH3_128,
            uuid=store_uuid,
            bucket_bits=index_bucket_bits(slot_capacity, max_index_entries or 0),
            backend=backend_path,
        )
        meta_bytes = (meta_size or default_meta_size(size)) if preallocate else 0
        meta = Meta(store_dir, readonly=False, create=True, map_size=meta_bytes)
        try:

            def init(txn: Any) -> None:
                txn.put(KEY_FORMAT, FORMAT.pack(FORMAT_MAGIC, FORMAT_VERSION), db=meta.info)
                txn.put(KEY_CONFIG, config.pack(), db=meta.info)
                state = State(0, 0, 0, 0, 0, clean=1)
                txn.put(KEY_STATE, state.pack(), db=meta.info)
                if meta_bytes:
                    txn.put(KEY_PREALLOC, PREALLOC.pack(meta_bytes), db=meta.info)

            meta.write(init)
            meta.sync()
        finally:
            meta.close()
        if preallocate:
            _preallocate_meta(store_dir, meta_bytes)
        # Last: a store directory without its lock file is a create that was interrupted.
        lock_path = os.path.join(store_dir, LOCK_FILE)
        os.close(os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE))
        sync_file(os.path.join(store_dir, META_DIR))
        sync_file(store_dir)
    except OSError as exc:
        _remove_partial(store_dir, made_dir, backend_path if made_backend else "")
        raise StoreError(f"cannot create {store_dir}: {exc.strerror}") from exc
    except BaseException:
        _remove_partial(store_dir, made_dir, backend_path if made_backend else "")
        raise


def default_meta_size(size: int) -> int:
    """Bytes of ``data.mdb`` to preallocate for a device of ``size`` bytes: `META_PREALLOC_PER_PAGE`
    per page, rounded up to a MiB: the most a device full of pages at least half of which are
    duplicates takes, overwrites included (42 bytes a page measured; a device of distinct pages
    takes up to 52 and outgrows it past nine tenths full; docs/measurements.md, "Metadata per
    page"). Past it the map grows, with a warning. On ramfs this is RAM taken at create, hence
    not more by default; ``meta_size`` sets it."""
    wanted = max(META_PREALLOC_MIN, size // PAGE_SIZE * META_PREALLOC_PER_PAGE)
    return -(-wanted // (1 << 20)) * (1 << 20)


def _preallocate_meta(store_dir: str, meta_bytes: int) -> None:
    """Write ``data.mdb`` with zeros up to ``meta_bytes`` and every block of ``lock.mdb`` (LMDB
    writes its reader table through a shared mapping; a hole there would be allocated while
    serving). Existing content is kept; both are synced."""
    for name, end in (("data.mdb", meta_bytes), ("lock.mdb", None)):
        path = os.path.join(store_dir, META_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            fill_holes(fd, max(end or 0, os.fstat(fd).st_size), path)
        finally:
            os.close(fd)


def _remove_partial(store_dir: str, made_dir: bool, made_backend: str) -> None:
    """Remove what a failed create made: the store's files, its directory if it made it, and
    ``made_backend`` (a backend file it created; an existing file or device is left as it was)."""
    for name in (DATA_FILE, LOCK_FILE, "meta/data.mdb", "meta/lock.mdb", "meta"):
        target = os.path.join(store_dir, name)
        with contextlib.suppress(OSError):
            os.rmdir(target) if os.path.isdir(target) else os.unlink(target)
    if made_dir:
        with contextlib.suppress(OSError):
            os.rmdir(store_dir)
    if made_backend:
        with contextlib.suppress(OSError):
            os.unlink(made_backend)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
