"""The dedupblk on-disk format, version 1. This docstring is the specification; code refers to it.

Words: a *page* is 4 KiB of the device, a *slot* is 4 KiB of the backend, the *map* sends pages
to slots (or to an inline fill pattern), the *index* sends fingerprints to slots, a slot's
*refcount* is the number of map entries naming it.

Store directory
---------------
``STORE/meta/``  the LMDB environment (``data.mdb``, ``lock.mdb``) holding all metadata.
``STORE/slots``  the data file of 4 KiB slots, unless the store was created with another backend
                 (a file or a block device such as ``/dev/zram0``), whose path is in ``config``.
``STORE/lock``   an advisory ``flock``: a writer holds it exclusively, a read-only server shared;
                 the writer writes its pid and command line into it so a refused opener can name it.

Backend
-------
Slot ``s`` occupies bytes ``[s * 4096, (s + 1) * 4096)`` of the backend. Slot 0 is the backend
header (`BACKEND_HEADER`: magic ``DDBKSLOT``, format version, the store's 16-byte uuid, flags u32)
so that a store refuses a backend that belongs to another store. Data slots are
``1 .. slot_capacity - 1``. A freed slot is punched (``fallocate(PUNCH_HOLE)`` on a file,
``BLKDISCARD`` on a block device) once the transaction that freed it is durable, except in a file
whose header has `BACKEND_PREALLOCATED`: such a file was written in full with zeros at create and
is never punched, so that writing a slot never allocates file blocks. A file with that flag, and
every block device backend, is read and written with ``O_DIRECT``. Header flags unknown to this
version are zero; a header written before flags existed reads as flags 0 (the rest of slot 0 is
zeros).

LMDB sub-databases (all integer keys are u64 big-endian so that key order is numeric order)
-------------------------------------------------------------------------------------------
``info``   b"format" -> `FORMAT`  (magic ``DEDUPBLK``, version u32)
           b"config" -> `CONFIG`  (fixed at create; backend path follows the fixed part, UTF-8)
           b"state"  -> `STATE`   (updated by every committing transaction)
           b"prealloc" -> `PREALLOC` (u64: bytes of ``meta/data.mdb`` written with zeros at create;
                      absent in a store created without preallocation). A writer maps exactly
                      that much while the data fits in it (see "Preallocated stores").
``map``    page u64be -> `MAP_ENTRY` (kind u8, value u64le). kind 1 = SLOT: value is the slot.
           kind 2 = FILL: value is the 8-byte word (little-endian) the page repeats 512 times; never
           zero. An all-zero page has no entry at all: absent means zeros.
``refs``   slot u64be -> `REF` (refcount u32 >= 1, fingerprint of the slot's data, 16 bytes).
           A slot with no ``refs`` entry holds no live data.
``index``  fingerprint (16 bytes) -> `INDEX_ENTRY` (slot u64, seq u64). At most one entry per
           fingerprint. seq orders entries by age for pruning.
``age``    seq u64be -> fingerprint. Present only when ``max_index_entries`` is set: one entry per
           index entry, so the oldest index entries are found first.
``free``   slot u64be -> b"". Slots below ``slot_high`` whose data is dead and may be reused.
``deferred`` slot u64be -> b"". Slots freed since the last durable point: dead, but not reusable
           (nor punched) until a flush has made the transaction that freed them durable. The flush
           then punches them and moves them to ``free``; opening a store for writing does the same.

Fingerprints are XXH3-128 of the 4096 page bytes (``xxhash.xxh3_128_digest``), algorithm id 1.
A fingerprint match is never trusted: the slot's bytes are compared with the page before sharing.

Invariants (``dedupblk check`` verifies each by name; see `dedupblk.store.check`)
--------------------------------------------------------------------------------
- refcounts:  every ``refs`` refcount equals the number of SLOT map entries naming that slot, and
              every slot a map entry names has a ``refs`` entry.
- free-live:  no slot is in two of ``refs``, ``free`` and ``deferred``, and no mapping names a
              free or deferred slot.
- leaks:      every slot in ``1 .. slot_high - 1`` is in ``refs``, ``free`` or ``deferred``.
- index:      every index entry names a slot in ``refs`` whose data hashes to the entry's key;
              with ``max_index_entries``, ``age`` and ``index`` are in one-to-one correspondence.
- bounds:     every map key is a page of the device; every slot named anywhere is in
              ``1 .. slot_high - 1`` and ``slot_high <= slot_capacity``; FILL values are non-zero.
- counters:   ``state.mapped_pages`` and ``state.same_filled_pages`` equal the counts of SLOT and
              FILL map entries.

Write order and durability
--------------------------
1. Page data is written only into a slot that no committed map entry names (a slot from ``free``
   that was not freed since the last durable point, or a slot at ``slot_high``).
2. The LMDB transaction that maps it commits after the data write returned.
3. A write is acknowledged to a frontend's client; it survives a kill of the server once its
   transaction committed (LMDB commits land in the page cache; slot data already did).
4. ``flush`` (and any FUA write): ``fdatasync`` of the backend, then a synchronous LMDB commit. A
   slot freed by a transaction goes to ``deferred`` and is not reused, nor punched, until such a
   flush, so no durable mapping can name overwritten data.
On open for writing the store first syncs both, so a commit that survived a process kill becomes
the durable point the deferred-free rule relies on, then releases ``deferred``.

Preallocated stores (``create --preallocate``, for swap)
------------------------------------------------------
Every block of the store's files is allocated and written (not an unwritten extent, not a hole)
before the store is first served: the slot data file in full (a block device backend needs
nothing), ``meta/data.mdb`` up to ``prealloc`` bytes, ``meta/lock.mdb`` in full; then each is
``fdatasync``-ed. Serving then never allocates a file block nor converts an extent as long as the
metadata fits in ``prealloc``: slots are never punched (see Backend), and LMDB (which changes its
pages in the writable map) only writes below its map size, which a writer sets to ``prealloc``. If
the metadata outgrows it, the map grows past it and the file is extended as in any store (with a
warning in the log). Slot I/O is ``O_DIRECT``: writing a slot needs no page-cache page. On a
filesystem mounted ``lazytime`` (timestamps not journalled) the server's writes to these files
then never wait for the filesystem's journal nor for a block allocation. They still take their
bios from the pool the kernel's swap-outs use, which a block device backend does not (see "Swap
placement" in docs/swap.md). Durability is unchanged: ``flush`` still syncs both.

Metadata writes: a writer opens LMDB with ``MDB_WRITEMAP`` (dirty pages are changed in the shared
map; no ``pwrite`` per page at commit) and ``MDB_NOSYNC``. LMDB extends ``data.mdb`` to the map
size; every block of it is allocated (``posix_fallocate``) before the map is used or grown, so a
full filesystem fails the growth with ``StoreFull`` instead of faulting a write into a hole.

Power loss: LMDB commits between flushes are not synced (``MDB_NOSYNC``). LMDB documents that such
commits keep their atomicity only on a filesystem that preserves write order; on one that does not
(ext4 reorders writeback), a power loss or kernel crash between flushes can leave the metadata
unusable. A kill of the server process is always safe: committed pages sit in the page cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NewType

PAGE_SIZE = 4096
PAGE_SHIFT = 12
FORMAT_MAGIC = b"DEDUPBLK"
FORMAT_VERSION = 1
BACKEND_MAGIC = b"DDBKSLOT"
FINGERPRINT_XXH3_128 = 1
DEFAULT_MAX_SHARE = 254  # dm-vdo's limit on references per physical block
HEADER_SLOT = 0
FIRST_DATA_SLOT = 1

PageNo = NewType("PageNo", int)
SlotNo = NewType("SlotNo", int)
Fingerprint = NewType("Fingerprint", bytes)

# Files of the store directory (see "Store directory").
META_DIR = "meta"
DATA_FILE = "slots"
LOCK_FILE = "lock"

# Sub-database names.
DB_INFO = b"info"
DB_MAP = b"map"
DB_REFS = b"refs"
DB_INDEX = b"index"
DB_AGE = b"age"
DB_FREE = b"free"
DB_DEFERRED = b"deferred"
ALL_DBS = (DB_INFO, DB_MAP, DB_REFS, DB_INDEX, DB_AGE, DB_FREE, DB_DEFERRED)

KEY_FORMAT = b"format"
KEY_CONFIG = b"config"
KEY_STATE = b"state"
KEY_PREALLOC = b"prealloc"

KIND_SLOT = 1
KIND_FILL = 2

U64BE = struct.Struct(">Q")  # every integer key: page, slot, seq
FORMAT = struct.Struct("<8sI")  # magic, version
MAP_ENTRY = struct.Struct("<BQ")  # kind, slot or fill word
REF = struct.Struct("<I16s")  # refcount, fingerprint
INDEX_ENTRY = struct.Struct("<QQ")  # slot, seq
BACKEND_HEADER = struct.Struct("<8sI16sI")  # magic, version, store uuid, flags
BACKEND_PREALLOCATED = 0x1  # header flag: the file was written in full; never punch it
PREALLOC = struct.Struct("<Q")  # info/prealloc: bytes of meta/data.mdb written at create
# size, page_size, slot_capacity, max_index_entries (0: unbounded), max_share, fingerprint algo,
# store uuid; the backend path (UTF-8, empty for STORE/slots) follows.
CONFIG = struct.Struct("<QIQQIB16s")
# slot_high, mapped_pages, same_filled_pages, next_seq, clean (1 after an orderly close)
STATE = struct.Struct("<QQQQB")


@dataclass(frozen=True)
class Config:
    """The ``info/config`` record: fixed when the store is created."""

    size: int
    page_size: int
    slot_capacity: int
    max_index_entries: int  # 0: unbounded
    max_share: int
    fingerprint: int
    uuid: bytes
    backend: str  # "" means STORE/slots

    def pack(self) -> bytes:
        return (
            CONFIG.pack(
                self.size,
                self.page_size,
                self.slot_capacity,
                self.max_index_entries,
                self.max_share,
                self.fingerprint,
                self.uuid,
            )
            + self.backend.encode()
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Config:
        size, page_size, capacity, max_index, max_share, algo, uuid = CONFIG.unpack_from(raw)
        return cls(
            size, page_size, capacity, max_index, max_share, algo, uuid, raw[CONFIG.size :].decode()
        )

    @property
    def pages(self) -> int:
        return self.size // self.page_size


@dataclass
class State:
    """The ``info/state`` record: rewritten by every committing transaction."""

    slot_high: int  # slots below this were used at least once
    mapped_pages: int  # SLOT map entries
    same_filled_pages: int  # FILL map entries
    next_seq: int  # next index age sequence number
    clean: int  # 1 after an orderly close, 0 while open for writing

    def pack(self) -> bytes:
        return STATE.pack(
            self.slot_high, self.mapped_pages, self.same_filled_pages, self.next_seq, self.clean
        )

    @classmethod
    def unpack(cls, raw: bytes) -> State:
        return cls(*STATE.unpack(raw))


def page_key(page: int) -> bytes:
    return U64BE.pack(page)


def slot_key(slot: int) -> bytes:
    return U64BE.pack(slot)


def key_int(key: bytes) -> int:
    value: int = U64BE.unpack(key)[0]
    return value
