"""``dedupblk upgrade STORE``: a version-1 store converted to version 2 in place.

The slots stay where they are. The version-2 metadata is built in ``meta.new`` from the version-1
records (`dedupblk.store.v1`) and synced; ``renameat2(RENAME_EXCHANGE)`` then swaps the two
directories in one step, and the old one is removed. Whenever the process is killed, ``meta``
holds one complete version: version 1 until the exchange, version 2 after it. A ``meta.new`` left
by a killed upgrade is removed by the next one (it is never opened as a store).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmdb

from ..errors import FormatError, NotAStore, StoreError
from ..libc import function, os_error
from . import v1
from .backend import Backend, fill_holes, sync_file
from .format import (
    DATA_FILE,
    FILL_ENTRY,
    FINGERPRINT_XXH3_128,
    FORMAT,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    FP_CHUNK_SLOTS,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_PREALLOC,
    KEY_STATE,
    MAP_CHUNK_PAGES,
    MAX_SHARE,
    MAX_SLOTS,
    META_DIR,
    META_NEW_DIR,
    PAGE_SIZE,
    PREALLOC,
    REF_CHUNK_SLOTS,
    U32BE,
    U64BE,
    U64LE,
    Config,
    State,
    fill_key,
    index_bucket_bits,
    map_key,
)
from .lock import StoreLock
from .meta import Meta, read_format

log = logging.getLogger(__name__)
AT_FDCWD = -100
RENAME_EXCHANGE = 2
_renameat2 = function(
    "renameat2", ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
    ctypes.c_uint,
)  # fmt: skip
_U32 = struct.Struct("<I")
PUT_BATCH = 4096  # records per write transaction while building


@dataclass(frozen=True)
class UpgradeResult:
    from_version: int
    pages: int  # map entries converted
    slots: int  # live slots
    index_entries: int


def upgrade_store(
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> UpgradeResult:
    """Convert the store at ``path`` to the current format (see the module docstring). A store
    already at the current version is left as it is (a stale ``meta.new`` is removed)."""
    store_dir = os.fspath(path)
    if not os.path.isfile(os.path.join(store_dir, META_DIR, "data.mdb")):
        raise NotAStore(f"{store_dir}: no dedupblk store here")
    lock = StoreLock(store_dir, exclusive=True)
    try:
        shutil.rmtree(os.path.join(store_dir, META_NEW_DIR), ignore_errors=True)
        old = lmdb.open(
            os.path.join(store_dir, META_DIR), readonly=True, max_dbs=len(v1.DB_NAMES) + 1,
            lock=False, subdir=True,
        )  # fmt: skip
        try:
            info = old.open_db(b"info", create=False)
            version = read_format(old, info, store_dir)
            if version == FORMAT_VERSION:
                return UpgradeResult(version, 0, 0, 0)
            if version != v1.VERSION:
                raise FormatError(f"{store_dir} has format version {version}: no upgrade known")
            result = _build(store_dir, old, progress or (lambda _n: None), on_total)
        except (lmdb.Error, struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{store_dir}: the version-1 metadata is damaged ({exc})") from exc
        finally:
            old.close()
        log.info("%s: version-2 metadata complete; exchanging it for version 1", store_dir)
        _exchange(store_dir)
        log.info("%s: now version 2; removing the version-1 metadata", store_dir)
        shutil.rmtree(os.path.join(store_dir, META_NEW_DIR))
        return result
    finally:
        lock.release()


def _build(
    store_dir: str,
    old: Any,
    progress: Callable[[int], None],
    on_total: Callable[[int], None] | None,
) -> UpgradeResult:
    dbs = {name: old.open_db(name, create=False) for name in v1.DB_NAMES}
    with old.begin(db=dbs[b"info"]) as txn:
        raw_config, raw_state = txn.get(b"config"), txn.get(b"state")
        raw_prealloc = txn.get(b"prealloc")
        if on_total is not None:
            on_total(sum(txn.stat(dbs[name])["entries"] for name in (b"map", b"refs", b"index")))
    if raw_config is None or raw_state is None:
        raise FormatError(f"{store_dir}: the version-1 config or state record is missing")
    size, page_size, capacity, max_index, max_share, algo, uuid = v1.CONFIG.unpack_from(raw_config)
    backend_path = raw_config[v1.CONFIG.size :].decode()
    clean = v1.STATE.unpack(raw_state)[4]
    if page_size != PAGE_SIZE or algo != FINGERPRINT_XXH3_128 or capacity > MAX_SLOTS:
        raise FormatError(f"{store_dir}: a version-1 store this version cannot convert")
    # The slots first: what a killed version-1 writer committed becomes durable, and the backend
    # must be this store's.
    backend = Backend(backend_path or os.path.join(store_dir, DATA_FILE), readonly=False)
    try:
        backend.check_header(uuid)
        backend.sync()
    finally:
        backend.close()
    sync_file(os.path.join(store_dir, META_DIR, "data.mdb"))
    bits = index_bucket_bits(capacity, max_index)
    config = Config(
        size, page_size, capacity, max_index, min(max_share, MAX_SHARE), algo, uuid, bits,
        backend_path,
    )  # fmt: skip
    prealloc = PREALLOC.unpack(raw_prealloc)[0] if raw_prealloc is not None else 0
    log.info("%s: building version-2 metadata in %s", store_dir, META_NEW_DIR)
    new = Meta(store_dir, readonly=False, create=True, subdir=META_NEW_DIR, map_size=prealloc)
    try:
        builder = _Builder(new, config)
        with old.begin() as txn:
            builder.convert(txn, dbs, progress)

        def finish(txn: Any) -> None:
            txn.put(KEY_FORMAT, FORMAT.pack(FORMAT_MAGIC, FORMAT_VERSION), db=new.info)
            txn.put(KEY_CONFIG, config.pack(), db=new.info)
            txn.put(KEY_STATE, builder.state(clean).pack(), db=new.info)
            if prealloc:
                txn.put(KEY_PREALLOC, PREALLOC.pack(prealloc), db=new.info)

        new.write(finish)
        new.sync()
    finally:
        new.close()
    if prealloc:
        for name, end in (("data.mdb", prealloc), ("lock.mdb", 0)):
            target = os.path.join(store_dir, META_NEW_DIR, name)
            fd = os.open(target, os.O_RDWR)
            try:
                fill_holes(fd, max(end, os.fstat(fd).st_size), target)
            finally:
                os.close(fd)
    sync_file(os.path.join(store_dir, META_NEW_DIR))
    return UpgradeResult(v1.VERSION, builder.pages, builder.slots, builder.entries)


class _Builder:
    """Version-2 records from version-1 ones, put in transactions of `PUT_BATCH` records."""

    def __init__(self, meta: Meta, config: Config) -> None:
        self.meta = meta
        self.config = config
        self.pending: list[tuple[Any, bytes, bytes]] = []
        self.pages = self.fills = self.slots = self.entries = 0

    def put(self, db: Any, key: bytes, value: bytes) -> None:
        self.pending.append((db, key, value))
        if len(self.pending) >= PUT_BATCH:
            self.flush()

    def flush(self) -> None:
        records, self.pending = self.pending, []

        def body(txn: Any) -> None:
            for db, key, value in records:
                txn.put(key, value, db=db)

        if records:
            self.meta.write(body)

    def convert(self, txn: Any, dbs: dict[bytes, Any], progress: Callable[[int], None]) -> None:
        meta, config = self.meta, self.config
        chunk_no, chunk = -1, bytearray()
        for key, value in txn.cursor(db=dbs[b"map"]):
            page = v1.U64BE.unpack(key)[0]
            kind, word = v1.MAP_ENTRY.unpack(value)
            if page // MAP_CHUNK_PAGES != chunk_no:
                if chunk_no >= 0:
                    self.put(meta.map, map_key(chunk_no), bytes(chunk))
                chunk_no, chunk = page // MAP_CHUNK_PAGES, bytearray(MAP_CHUNK_PAGES * 4)
            entry = word if kind == v1.KIND_SLOT else FILL_ENTRY
            _U32.pack_into(chunk, (page % MAP_CHUNK_PAGES) * 4, entry)
            if kind == v1.KIND_FILL:
                self.put(meta.fills, fill_key(page), U64LE.pack(word))
                self.fills += 1
            else:
                self.pages += 1
            progress(1)
        if chunk_no >= 0:
            self.put(meta.map, map_key(chunk_no), bytes(chunk))
        refs: dict[int, bytearray] = {}
        fps: dict[int, bytearray] = {}
        for key, value in txn.cursor(db=dbs[b"refs"]):
            slot = v1.U64BE.unpack(key)[0]
            refcount, fp = v1.REF.unpack(value)
            if refcount > MAX_SHARE:
                raise FormatError(
                    f"slot {slot} is shared by {refcount} pages; version 2 allows {MAX_SHARE}"
                )
            refs.setdefault(slot // REF_CHUNK_SLOTS, bytearray(REF_CHUNK_SLOTS))[
                slot % REF_CHUNK_SLOTS
            ] = refcount
            fp_chunk = fps.setdefault(slot // FP_CHUNK_SLOTS, bytearray(FP_CHUNK_SLOTS * 4))
            _U32.pack_into(fp_chunk, (slot % FP_CHUNK_SLOTS) * 4, int.from_bytes(fp[:4], "big"))
            self.slots += 1
            progress(1)
        for number, chunk_refs in refs.items():
            self.put(meta.refs, U64BE.pack(number), bytes(chunk_refs))
        for number, chunk_fps in fps.items():
            self.put(meta.fps, U64BE.pack(number), bytes(chunk_fps))
        shift = 32 - config.bucket_bits
        buckets: dict[int, list[tuple[int, bytes, int]]] = {}
        for key, value in txn.cursor(db=dbs[b"index"]):
            slot, seq = v1.INDEX_ENTRY.unpack(value)
            fp = bytes(key)
            buckets.setdefault(int.from_bytes(fp[:4], "big") >> shift, []).append(
                (seq, fp[4:6], slot)
            )
            progress(1)
        cap = config.bucket_cap
        for bucket, entries in buckets.items():
            entries.sort()  # oldest first, as version 2 keeps them
            kept = _within(entries, cap, refs) if cap else entries
            tags = b"".join(tag for _, tag, _ in kept)
            slots = b"".join(_U32.pack(slot) for _, _, slot in kept)
            self.put(meta.index, U32BE.pack(bucket), tags + slots)
            self.entries += len(kept)
        self.flush()

    def state(self, clean: int) -> State:
        return State(self.pages, self.fills, 0, self.slots, self.entries, clean)


def _within(
    found: list[tuple[int, bytes, int]], cap: int, refs: dict[int, bytearray]
) -> list[tuple[int, bytes, int]]:
    """A bucket's entries within its cap: the oldest of singly-referenced slots go first."""
    keep = list(found)
    i = 0
    while len(keep) > cap and i < len(keep):
        slot = keep[i][2]
        if refs[slot // REF_CHUNK_SLOTS][slot % REF_CHUNK_SLOTS] == 1:
            del keep[i]
        else:
            i += 1
    return keep


def _exchange(store_dir: str) -> None:
    """Swap ``meta`` and ``meta.new`` in one step, then make the swap durable."""
    old = os.fsencode(os.path.join(store_dir, META_DIR))
    new = os.fsencode(os.path.join(store_dir, META_NEW_DIR))
    if _renameat2(AT_FDCWD, new, AT_FDCWD, old, RENAME_EXCHANGE) != 0:
        error = os_error("renameat2(RENAME_EXCHANGE)")
        raise StoreError(f"cannot swap in the new metadata of {store_dir}: {error.strerror}")
    sync_file(store_dir)
