"""The dedupblk on-disk format, version 2. This docstring is the specification; code refers to it.

Words: a *page* is 4 KiB of the device, a *slot* is 4 KiB of the backend, the *map* sends pages
to slots (or to an inline fill pattern), the *index* sends fingerprints to slots, a slot's
*refcount* is the number of map entries naming it. A *volume* is one device of the store; this
version serves volume 0 only, and every per-device key starts with the volume number so that a
store can hold more than one.

Store directory (mode 0700; every file in it 0600)
--------------------------------------------------
``STORE/meta/``  the LMDB environment (``data.mdb``, ``lock.mdb``) holding all metadata.
``STORE/slots``  the data file of 4 KiB slots, unless the store was created with another backend
                 (a file or a block device such as ``/dev/zram0``), whose path is in ``config``.
``STORE/lock``   the name of the process that holds the store's lock (pid and command line),
                 so that a refused opener can name it. The lock itself is an advisory ``flock`` on
                 the store directory (a file could be unlinked and made anew while locked): a
                 writer holds it exclusively, a read-only opener shared.

Backend
-------
Slot ``s`` occupies bytes ``[s * 4096, (s + 1) * 4096)`` of the backend. Slot 0 is the backend
header (`BACKEND_HEADER`: magic ``DDBKSLOT``, header version 1, the store's 16-byte uuid, flags
u32) so that a store refuses a backend that belongs to another store. Data slots are ``1 ..
slot_capacity - 1`` (``slot_capacity`` is at most `MAX_SLOTS`, so that a slot number fits a map
entry). A freed slot is released (see "Write order") and then punched (``fallocate(PUNCH_HOLE)``
on a file, ``BLKDISCARD`` on a block device: zram frees its memory): in a volatile store at once;
in a durable one at the next flush (or once more than `store.UNPUNCHED_LIMIT` wait), unless a
write takes the slot first (allocation prefers such slots: a slot written again needs no punch).
Nothing is punched in a file whose header has `BACKEND_PREALLOCATED`: such a file was written in
full with zeros at create, so that writing a slot never allocates file blocks. A file with that
flag, and every block device backend, is read and written with ``O_DIRECT``.

LMDB sub-databases (integer keys big-endian, so that key order is numeric order; values
little-endian)
-----------------------------------------------------------------------------------------------
``info``   b"format" -> `FORMAT`  (magic ``DEDUPBLK``, version u32 = 2)
           b"config" -> `CONFIG`  (fixed at create; the backend path follows the fixed part)
           b"state"  -> `STATE`   (counters; rewritten by every committing transaction)
           b"prealloc" -> `PREALLOC` (u64: bytes of ``meta/data.mdb`` written with zeros at create;
                      absent in a store created without preallocation). A writer maps exactly
                      that much while the data fits in it (see "Preallocated stores").
``map``    `MAP_KEY` (volume u32, chunk u64) -> `MAP_CHUNK_PAGES` entries u32: pages ``chunk *
           MAP_CHUNK_PAGES`` and on. Entry 0: the page is zeros (absent chunk: all zeros, and a
           chunk whose entries all become 0 is deleted). `FILL_ENTRY`: the page repeats the
           8-byte word its ``fills`` record holds. `LOST_ENTRY`: the page's data was found
           damaged (see "Repair"); reading it fails with EIO until it is written or trimmed.
           Any other value is the slot holding the page.
``fills``  `FILL_KEY` (volume u32, page u64) -> u64 word (never zero), for each FILL entry.
``refs``   chunk u64 -> `REF_CHUNK_SLOTS` refcounts u8, slots ``chunk * REF_CHUNK_SLOTS`` and on
           (absent: all 0). Refcount 0: the slot is free. A refcount never exceeds ``max_share``,
           which is at most `MAX_SHARE` (255).
``fps``    chunk u64 -> `FP_CHUNK_SLOTS` fingerprint words u32: for each live slot, the first 4
           bytes (big-endian) of the fingerprint of its data; meaningless for a free slot. The
           word checks the data (``check``) and names the slot's index bucket.
``index``  bucket u32 -> n tags u16, then n slots u32 (6n bytes; absent: empty), oldest entry
           first. A page's fingerprint ``fp`` (16 bytes) falls in bucket ``fp[0:4] >> (32 -
           bucket_bits)`` with tag ``fp[4:6]``. An entry says "the slot may hold this page":
           it is never trusted, the slot's bytes are compared with the page before sharing.

Fingerprints are XXH3-128 of the 4096 page bytes (``xxhash.xxh3_128_digest``), algorithm id 1.
A page that is all zeros has no map entry; one that repeats a non-zero 8-byte word is a FILL
entry (no slot); any other page is stored in a slot, shared with every page of the same bytes
while the slot's refcount is below ``max_share``. ``bucket_bits`` is chosen at create from the
index's capacity (`index_bucket_bits`): about `BUCKET_TARGET_ENTRIES` entries a bucket when every
slot the index may hold is indexed. With ``max_index_entries`` each bucket keeps about its share
(`Config.bucket_cap`): adding an entry past it drops the bucket's oldest entries of slots with one
reference (such pages stop being dedup targets; the slots stay); entries of shared slots stay.

What is not stored, because it follows from what is: a slot is free exactly when its refcount is
0 (there is no free list); a page is zeros exactly when it has no entry; which slots have ever
been used. ``state`` keeps counters so that ``stats`` need not count.

Invariants (``dedupblk check`` verifies each by name; see `dedupblk.store.check`)
--------------------------------------------------------------------------------
- lmdb:          the LMDB file is structurally sound (``lmdb.verify``).
- bounds:        every map chunk, fill and refs chunk lies within the device and the backend;
                 every slot named is in ``1 .. slot_capacity - 1``; fill words are non-zero;
                 every FILL entry has a fill record and every fill record a FILL entry.
- refcounts:     every slot's refcount equals the number of map entries naming it.
- fingerprints:  every live slot's data hashes to its ``fps`` word.
- index:         every entry names a live slot, in the bucket of its ``fps`` word, whose data
                 has the entry's tag; no slot has two entries.
- counters:      ``state`` equals the counts of SLOT, FILL and LOST entries, of live slots and
                 of index entries.

Write order and durability
--------------------------
1. Page data is written only into a free slot that is *released*: no state of the metadata that
   may still be what a restart finds names it.
2. Durable stores: the data writes are ``fdatasync``-ed; then the LMDB transaction that maps them
   commits.
3. A write is acknowledged to a frontend's client; it survives a kill of the server once its
   transaction committed, and (durable stores) a power cut once a flush returned.
4. ``flush`` (and any FUA write): commit, then make that commit durable.

Two kinds of store, decided each time a store is opened for writing:

*Durable* (metadata and slots both on disks): LMDB commits with ``MDB_NOMETASYNC`` (each commit
syncs its data pages, so a commit is durable once the next one, or a flush, has synced its meta
page; LMDB never reuses the pages of the last two commits, so a power cut loses at most the last
commit and never corrupts). A slot freed by commit N is released when commit N + 1 has
committed: from then on no state a power cut can return to names it (N - 1 is no longer one).
Slot data is synced before the commit that maps it (step 2), so a durable mapping never names a
slot whose new data did not reach the disk.

*Volatile* (the metadata on ramfs or tmpfs, or the slots in RAM: a zram or brd block device, or
a file on ramfs or tmpfs): the store cannot outlive the machine (or cannot outlive it with its
slots), so there is no power cut to survive, only a kill of the server, after which every
committed transaction is still in memory. LMDB commits with ``MDB_NOSYNC``; a slot freed by a
commit is released at once after it (the commit is as durable as it will ever be), and discarded
on the backend, so zram frees its memory as it does for its own swap slots. Flush commits.

Either way a slot freed by a batch is never reused by that same batch: until its commit the slot
is still what the committed map names.

Preallocated stores (``create --preallocate``, for swap)
------------------------------------------------------
Every block of the store's files is allocated and written (not an unwritten extent, not a hole)
before the store is first served: the slot data file in full (a block device backend needs
nothing), ``meta/data.mdb`` up to ``prealloc`` bytes, ``meta/lock.mdb`` in full; then each is
``fdatasync``-ed. Serving then never allocates a file block nor converts an extent as long as the
metadata fits in ``prealloc``: slots are never punched (see Backend), and LMDB (which changes its
pages in the writable map) only writes below its map size, which a writer sets to ``prealloc``. If
the metadata outgrows it, the map grows past it and the file is extended as in any store (with a
warning in the log). Why swap needs this: docs/swap.md.

Metadata writes: a writer opens LMDB with ``MDB_WRITEMAP`` (dirty pages are changed in the shared
map; no ``pwrite`` per page at commit). LMDB extends ``data.mdb`` to the map size; every block of
it is allocated (``posix_fallocate``) before the map is used or grown, so a full filesystem fails
the growth with ``StoreFull`` instead of faulting a write into a hole.

Repair
------
``check --repair`` rebuilds what is derived from the map and the slots' data: refcounts (recounted),
the index (entries that do not verify are dropped), the fill records and the counters. It never
makes damaged data good: a live slot whose data no longer hashes to its ``fps`` word, a map entry
naming a slot outside the backend, and a FILL entry without its word become `LOST_ENTRY` (EIO,
like a bad sector) and are reported by device byte range; the slot is freed.

Upgrade from version 1
----------------------
``dedupblk upgrade STORE`` (`dedupblk.store.upgrade`) builds version-2 metadata in ``meta.new``
beside ``meta`` from the version-1 records (`dedupblk.store.v1`), syncs it, and exchanges the two
directories in one ``renameat2(RENAME_EXCHANGE)``; then it removes the old one. The slots stay
where they are. A kill at any moment leaves ``meta`` holding either complete version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NewType

PAGE_SIZE = 4096
PAGE_SHIFT = 12
FORMAT_MAGIC = b"DEDUPBLK"
FORMAT_VERSION = 2
BACKEND_MAGIC = b"DDBKSLOT"
BACKEND_VERSION = 1  # of the header in slot 0, unchanged since format version 1
FINGERPRINT_XXH3_128 = 1
FINGERPRINT_NAMES = {FINGERPRINT_XXH3_128: "xxh3-128"}
DEFAULT_MAX_SHARE = 254  # dm-vdo's limit on references per physical block
MAX_SHARE = 255  # a refcount is one byte
HEADER_SLOT = 0
FIRST_DATA_SLOT = 1
VOLUME = 0  # the one volume this version serves

# Each chunk value is 4080 bytes: exactly one LMDB overflow page (4096 bytes less its 16-byte
# header), so that changing one entry copies one page and no space is left over.
CHUNK_BYTES = 4080
MAP_CHUNK_PAGES = CHUNK_BYTES // 4  # 1020
REF_CHUNK_SLOTS = CHUNK_BYTES  # 4080
FP_CHUNK_SLOTS = CHUNK_BYTES // 4  # 1020
ZERO_ENTRY = 0
FILL_ENTRY = 0xFFFF_FFFF
LOST_ENTRY = 0xFFFF_FFFE
MAX_SLOTS = LOST_ENTRY  # slot numbers are below both sentinels
BUCKET_TARGET_ENTRIES = 32
INDEX_ENTRY_BYTES = 6  # tag u16 + slot u32

# Files of the store directory (see "Store directory").
META_DIR = "meta"
META_NEW_DIR = "meta.new"
DATA_FILE = "slots"
LOCK_FILE = "lock"
DIR_MODE = 0o700
FILE_MODE = 0o600

Fingerprint = NewType("Fingerprint", bytes)

# Sub-database names.
DB_INFO = b"info"
DB_MAP = b"map"
DB_FILLS = b"fills"
DB_REFS = b"refs"
DB_FPS = b"fps"
DB_INDEX = b"index"
ALL_DBS = (DB_INFO, DB_MAP, DB_FILLS, DB_REFS, DB_FPS, DB_INDEX)

KEY_FORMAT = b"format"
KEY_CONFIG = b"config"
KEY_STATE = b"state"
KEY_PREALLOC = b"prealloc"

U32BE = struct.Struct(">I")  # index bucket keys
U64BE = struct.Struct(">Q")  # refs and fps chunk keys
MAP_KEY = struct.Struct(">IQ")  # volume, chunk
FILL_KEY = struct.Struct(">IQ")  # volume, page
U64LE = struct.Struct("<Q")  # a fill word
FORMAT = struct.Struct("<8sI")  # magic, version
BACKEND_HEADER = struct.Struct("<8sI16sI")  # magic, version, store uuid, flags
BACKEND_PREALLOCATED = 0x1  # header flag: the file was written in full; never punch it
PREALLOC = struct.Struct("<Q")  # info/prealloc: bytes of meta/data.mdb written at create
# size, page_size, slot_capacity, max_index_entries (0: unbounded), max_share, fingerprint algo,
# store uuid, bucket_bits; the backend path (UTF-8, empty for STORE/slots) follows.
CONFIG = struct.Struct("<QIQQIB16sB")
# mapped_pages (SLOT entries), same_filled_pages (FILL), lost_pages (LOST), stored_slots (live),
# index_entries, clean (1 after an orderly close, 0 while open for writing)
STATE = struct.Struct("<QQQQQB")


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
    bucket_bits: int
    backend: str  # "" means STORE/slots
    format_version: int = FORMAT_VERSION  # from the ``format`` record, not packed here

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
                self.bucket_bits,
            )
            + self.backend.encode()
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Config:
        size, page_size, capacity, max_index, max_share, algo, uuid, bits = CONFIG.unpack_from(raw)
        return cls(
            size, page_size, capacity, max_index, max_share, algo, uuid, bits,
            bytes(raw[CONFIG.size :]).decode(),
        )  # fmt: skip

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    @property
    def bucket_cap(self) -> int:
        """Most entries a bucket keeps with ``max_index_entries`` (0: no bound)."""
        if not self.max_index_entries:
            return 0
        return max(1, -(-self.max_index_entries // (1 << self.bucket_bits)))


@dataclass
class State:
    """The ``info/state`` record: rewritten by every committing transaction."""

    mapped_pages: int
    same_filled_pages: int
    lost_pages: int
    stored_slots: int
    index_entries: int
    clean: int

    def pack(self) -> bytes:
        return STATE.pack(
            self.mapped_pages, self.same_filled_pages, self.lost_pages, self.stored_slots,
            self.index_entries, self.clean,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> State:
        return cls(*STATE.unpack(raw))

    def copy(self) -> State:
        return State(
            self.mapped_pages, self.same_filled_pages, self.lost_pages, self.stored_slots,
            self.index_entries, self.clean,
        )  # fmt: skip


def index_bucket_bits(slot_capacity: int, max_index_entries: int) -> int:
    """Bits of the bucket number: about `BUCKET_TARGET_ENTRIES` entries a bucket when the index
    holds all it may (every slot, or ``max_index_entries``)."""
    most = min(slot_capacity, max_index_entries) if max_index_entries else slot_capacity
    buckets = max(1, most // BUCKET_TARGET_ENTRIES)
    return min(32, max(0, (buckets - 1).bit_length()))


def map_key(page_chunk: int) -> bytes:
    return MAP_KEY.pack(VOLUME, page_chunk)


def fill_key(page: int) -> bytes:
    return FILL_KEY.pack(VOLUME, page)
