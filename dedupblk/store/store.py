"""The `Store` API: a block device of 4 KiB pages over refcounted, deduplicated slots.

The on-disk format, its invariants and the write order are specified once in
`dedupblk.store.format`. This module implements them.

Group commit: `Store.write` classifies pages and keeps them in a bounded buffer of pending pages
(`GROUP_PAGES` pages or `GROUP_SECONDS` seconds, whichever comes first; a background thread
commits a batch that waited its time, unless the store was opened with ``group_commit=False``
by a caller that commits every batch itself). `Store.commit` applies the buffer in one LMDB write
transaction; `Store.flush` commits and makes everything durable. Reads see pending pages. A kill
of the process loses only pages still pending, which read back afterwards as their old content.

Every public method takes the store's lock, so any thread may call any method.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import stat
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .backend import Backend, fill_holes
from .errors import (
    BackendMismatch,
    InvalidRequest,
    NotAStore,
    ReadOnlyStore,
    StoreError,
    StoreExists,
    StoreFull,
    StoreLocked,
)
from .fingerprint import DATA, FILL, ZERO, ZERO_PAGE, FingerprintFn, classify, fill_page, xxh3_128
from .format import (
    DEFAULT_MAX_SHARE,
    FINGERPRINT_XXH3_128,
    FIRST_DATA_SLOT,
    FORMAT,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    INDEX_ENTRY,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_PREALLOC,
    KEY_STATE,
    KIND_FILL,
    KIND_SLOT,
    MAP_ENTRY,
    PAGE_SHIFT,
    PAGE_SIZE,
    PREALLOC,
    REF,
    U64BE,
    Config,
    State,
    key_int,
)
from .meta import META_DIR, Meta

if TYPE_CHECKING:
    from .check import Problem

log = logging.getLogger(__name__)

GROUP_PAGES = 1024  # pages buffered before a commit (4 MiB)
GROUP_SECONDS = 0.05  # longest a buffered page waits for its commit
DEFERRED_LIMIT = 1 << 16  # freed-but-not-durable slots before a commit forces a flush
SLOT_CACHE_PAGES = 1024  # slot contents kept for verifying duplicates (4 MiB)
DATA_FILE = "slots"
META_PREALLOC_PER_PAGE = 256  # bytes of data.mdb preallocated per page of the device
META_PREALLOC_MIN = 1 << 20
LOCK_FILE = "lock"

# A pending page: (kind, fill word, page bytes for DATA).
Pending = tuple[int, int, bytes | None]
_ZERO_PENDING: Pending = (ZERO, 0, None)
_pack_u64 = U64BE.pack
_unpack_map = MAP_ENTRY.unpack
_pack_map = MAP_ENTRY.pack
_unpack_ref = REF.unpack
_pack_ref = REF.pack
_unpack_index = INDEX_ENTRY.unpack
_pack_index = INDEX_ENTRY.pack


@dataclass(frozen=True)
class Statistics:
    """A consistent snapshot of a store's usage (the JSON keys of ``dedupblk stats``)."""

    size_bytes: int
    page_size: int
    mapped_pages: int
    same_filled_pages: int
    stored_pages: int
    index_entries: int
    dedup_ratio: float
    saved_bytes: int
    data_bytes: int
    metadata_bytes: int


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64K``, ``512M``, ``2G``, ``1T`` (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in units else ""
    number = value[: len(value) - len(suffix)]
    if not number.isdigit():
        raise InvalidRequest(f"bad size {text!r}: expected a number with an optional K/M/G/T")
    return int(number) * units[suffix]


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
    and a preallocated file is adopted as it is, without writing it again.
    """
    store_dir = os.fspath(path)
    if size <= 0 or size % PAGE_SIZE:
        raise InvalidRequest(f"bad size {size}: must be a positive multiple of {PAGE_SIZE}")
    if max_share < 1 or max_share > 0xFFFFFFFF:
        raise InvalidRequest(f"bad max-share {max_share}: must be at least 1")
    if max_index_entries is not None and max_index_entries < 1:
        raise InvalidRequest(f"bad max-index-entries {max_index_entries}: must be at least 1")
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
    if os.path.exists(store_dir):
        if not os.path.isdir(store_dir):
            raise StoreExists(f"{store_dir} exists and is not a directory")
        if os.listdir(store_dir):
            raise StoreExists(f"{store_dir} exists and is not empty")
        made_dir = False
    else:
        try:
            os.makedirs(store_dir)
        except OSError as exc:
            raise StoreError(f"cannot create {store_dir}: {exc.strerror}") from exc
        made_dir = True
    store_uuid = uuidlib.uuid4().bytes
    backend_path = os.path.abspath(backend) if backend else ""
    try:
        data_path = backend_path or os.path.join(store_dir, DATA_FILE)
        capacity = backend_size
        made_backend = bool(backend_path) and not os.path.exists(backend_path)
        parent = os.path.realpath(os.path.dirname(backend_path)) if backend_path else ""
        if made_backend and (parent == "/dev" or parent.startswith("/dev/")):
            raise BackendMismatch(f"backend {backend_path} does not exist (no file made in /dev)")
        if capacity is None and not (backend_path and _is_block_device(backend_path)):
            # The data file is sparse, so headroom costs nothing: it lets overwrites take new slots
            # while the old ones wait (deferred) for a flush, instead of forcing one. An existing
            # file (--reuse-backend) grows to it too; it never shrinks.
            capacity = PAGE_SIZE + size + (size // 4) // PAGE_SIZE * PAGE_SIZE
        slots = Backend.create(
            data_path, capacity, store_uuid, preallocate=preallocate, reuse=reuse_backend
        )
        try:
            slot_capacity = slots.capacity_slots()
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
            backend=backend_path,
        )
        meta_bytes = (meta_size or default_meta_size(size)) if preallocate else 0
        meta = Meta(store_dir, readonly=False, create=True, map_size=meta_bytes)
        try:

            def init(txn: Any) -> None:
                txn.put(KEY_FORMAT, FORMAT.pack(FORMAT_MAGIC, FORMAT_VERSION), db=meta.info)
                txn.put(KEY_CONFIG, config.pack(), db=meta.info)
                state = State(FIRST_DATA_SLOT, 0, 0, 0, clean=1)
                txn.put(KEY_STATE, state.pack(), db=meta.info)
                if meta_bytes:
                    txn.put(KEY_PREALLOC, PREALLOC.pack(meta_bytes), db=meta.info)

            meta.write(init)
            meta.sync()
        finally:
            meta.close()
        if preallocate:
            _preallocate_meta(store_dir, meta_bytes)
        with open(os.path.join(store_dir, LOCK_FILE), "w"):
            pass
    except BaseException:
        _remove_partial(store_dir, made_dir, backend_path if made_backend else "")
        raise


def default_meta_size(size: int) -> int:
    """Bytes of ``data.mdb`` to preallocate for a device of ``size`` bytes: `META_PREALLOC_PER_PAGE`
    per page, rounded up to a MiB. Measured: filling a store with unique pages takes about 210 to
    250 bytes of metadata per page; random overwrites of all of it, with LMDB's free pages, up to
    about 530 (with ``max_index_entries``). A server that locks its memory (ublk) keeps all of
    it in memory, hence not more by default; ``meta_size`` sets it."""
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


def open_store(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    fingerprint: FingerprintFn | None = None,
    group_commit: bool = True,
) -> Store:
    """Open a store: exclusively for writing, or shared with other read-only openers.

    ``fingerprint`` replaces XXH3-128 (tests inject colliding functions to prove that verify keeps
    different pages apart). ``group_commit=False`` is for a caller that commits every batch
    itself (the ublk server, once per pass): no background thread then commits on a timer, so
    none competes with the request path. Use as a context manager; `Store.close` flushes.
    """
    return Store(
        os.fspath(path),
        readonly=readonly,
        fingerprint=fingerprint or xxh3_128,
        group_commit=group_commit,
    )


class _StoreLock:
    """The ``STORE/lock`` flock: exclusive for a writer, shared for read-only servers."""

    def __init__(self, store_dir: str, *, exclusive: bool) -> None:
        lock_path = os.path.join(store_dir, LOCK_FILE)
        try:
            self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StoreLocked(f"{store_dir} is in use by another process ({holder})") from None
        if exclusive:
            try:
                with open("/proc/self/cmdline", "rb") as proc:
                    cmdline = proc.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmdline = ""
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()}: {cmdline.strip()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Store:
    """An open store. See the module docstring for batching and `dedupblk.store.format` for
    what survives a crash."""

    def __init__(
        self,
        store_dir: str,
        *,
        readonly: bool,
        fingerprint: FingerprintFn,
        group_commit: bool = True,
    ) -> None:
        if not os.path.isfile(os.path.join(store_dir, "meta", "data.mdb")):
            kind = "no such store" if not os.path.exists(store_dir) else "not a dedupblk store"
            raise NotAStore(f"{store_dir}: {kind}")
        self.path = store_dir
        self.readonly = readonly
        self._fingerprint = fingerprint
        self._lock = threading.RLock()
        self._closed = False
        self._file_lock = _StoreLock(store_dir, exclusive=not readonly)
        try:
            self._meta = Meta(store_dir, readonly=readonly)
            try:
                self.config, self._state = self._meta.read_header(store_dir)
                self.backend_path = self.config.backend or os.path.join(store_dir, DATA_FILE)
                self._backend = Backend(self.backend_path, readonly=readonly)
            except BaseException:
                self._meta.close()
                raise
        except BaseException:
            self._file_lock.release()
            raise
        try:
            self._backend.check_header(self.config.uuid)
            if self._backend.capacity_slots() < self.config.slot_capacity:
                raise BackendMismatch(
                    f"backend {self.backend_path} is smaller than when the store was created"
                )
        except BaseException:
            self._backend.close()
            self._meta.close()
            self._file_lock.release()
            raise
        self.size = self.config.size
        self.page_size = PAGE_SIZE
        self._pages = self.config.pages
        self._pending: dict[int, Pending] = {}
        self._pending_data = 0  # DATA pages in _pending: each may need one slot
        self._pending_since = 0.0
        self._available = 0  # slots a new page may take: free plus never used
        self._free_count = 0  # slots in the free database
        self._deferred = 0  # slots freed since the last durable point
        self._to_release: list[bytes] = []  # deferred slots a flush made durable: to punch
        self._releasing: set[bytes] = set()  # slots the committer is punching, without the lock
        self._committer: threading.Thread | None = None
        self._committer_idle = True  # it waits with no deadline: a new batch must wake it
        self._group_commit = group_commit  # commit a batch GROUP_SECONDS old in the background
        # Slot contents recently written or read for verification, so that a duplicate of a hot
        # page is verified without a read from the backend (bounded; see `_remember_slots`).
        self._slot_cache: dict[int, bytes] = {}
        self._wake = threading.Condition(self._lock)
        if not readonly:
            self._open_for_writing()

    # -- life cycle ------------------------------------------------------------------------------

    def _open_for_writing(self) -> None:
        """Make what a killed predecessor committed durable, release its deferred slots, and
        mark the store in use."""
        self._backend.sync()
        self._meta.sync()
        self._state.clean = 0
        self._meta.write(lambda txn: txn.put(KEY_STATE, self._state.pack(), db=self._meta.info))
        self._release_deferred(background=False)
        self._meta.sync()
        self._refresh_available()

    def close(self) -> None:
        """Flush everything and release the store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self.readonly:
                    self._flush_locked(wait=True)
                    self._state.clean = 1
                    self._meta.write(
                        lambda txn: txn.put(KEY_STATE, self._state.pack(), db=self._meta.info)
                    )
                    self._meta.sync()
            finally:
                self._closed = True
                self._wake.notify_all()
                self._backend.close()
                self._meta.close()
                self._file_lock.release()
        committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join()

    @property
    def backend_preallocated(self) -> bool:
        """Whether the slots are a file written in full at create and never punched."""
        return not self._backend.is_block and not self._backend.punches

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequest(
                f"request at {offset} of {length} bytes is outside the device ({self.size} bytes)"
            )
        if self._closed:
            raise StoreError("the store is closed")

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStore("the store is open read-only")

    def read(self, offset: int, length: int) -> bytes:
        """The device's bytes ``[offset, offset + length)``; unwritten bytes read as zeros."""
        with self._lock:
            self._check_range(offset, length)
            if length == 0:
                return b""
            first = offset >> PAGE_SHIFT
            last = (offset + length - 1) >> PAGE_SHIFT
            pending = self._pending
            meta = self._meta
            parts: list[bytes] = []
            get = meta.reader().get
            cache = self._slot_cache
            mapdb = meta.map
            for page in range(first, last + 1):
                entry = pending.get(page)
                if entry is not None:
                    parts.append(entry[2] or (fill_page(entry[1]) if entry[1] else ZERO_PAGE))
                    continue
                raw = get(_pack_u64(page), db=mapdb)
                if raw is None:
                    parts.append(ZERO_PAGE)
                    continue
                kind, value = _unpack_map(raw)
                if kind == KIND_SLOT:
                    parts.append(cache.get(value) or self._backend.read_slot(value))
                else:
                    parts.append(fill_page(value))
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            start = offset - (first << PAGE_SHIFT)
            if start == 0 and length == len(data):
                return data
            return data[start : start + length]

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset``. Partial pages are read, modified and written back.

        The pages are accepted into the pending batch and are visible to reads at once; they are
        committed within `GROUP_SECONDS` or at the next `commit`/`flush`, and durable after
        `flush` (``fua=True`` flushes before returning). A write that cannot get a slot raises
        `StoreFull`; pages of the same request that were accepted before it stay written, as on
        a disk where a failed write leaves the range partly updated.
        """
        with self._lock:
            length = len(data)
            if self.readonly or offset < 0 or offset + length > self.size or self._closed:
                self._check_writable()
                self._check_range(offset, length)
            if length == PAGE_SIZE and not offset & (PAGE_SIZE - 1):  # the common request
                self._accept(offset >> PAGE_SHIFT, data if type(data) is bytes else bytes(data))
                if fua:
                    self._flush_locked()
                return
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
            page = offset >> PAGE_SHIFT
            pos = 0
            while pos < length:
                in_page = (offset + pos) & (PAGE_SIZE - 1)
                take = min(PAGE_SIZE - in_page, length - pos)
                if take == PAGE_SIZE:
                    content = bytes(view[pos : pos + PAGE_SIZE])
                else:
                    old = self._page_locked(page)
                    content = old[:in_page] + bytes(view[pos : pos + take]) + old[in_page + take :]
                self._accept(page, content)
                pos += take
                page += 1
            if fua:
                self._flush_locked()

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zero a range: whole pages are unmapped (their slots dereferenced), partial pages are
        rewritten with zeros, which can need a slot (`StoreFull` on a full backend). Same
        durability as `write`."""
        self._zero(offset, length, fua, advisory=False)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range: whole pages are unmapped and read back as zeros. A partial page is
        rewritten with zeros too, except on a full backend, where that would need a slot: a
        discard never fails for lack of space, and such a page keeps its bytes."""
        self._zero(offset, length, fua, advisory=True)

    def _zero(self, offset: int, length: int, fua: bool, *, advisory: bool) -> None:
        with self._lock:
            self._check_writable()
            self._check_range(offset, length)
            end = offset + length
            page = offset >> PAGE_SHIFT
            while (page << PAGE_SHIFT) < end:
                start = max(offset, page << PAGE_SHIFT)
                stop = min(end, (page + 1) << PAGE_SHIFT)
                if stop - start == PAGE_SIZE:
                    self._accept(page, ZERO_PAGE)
                else:
                    old = self._page_locked(page)
                    lo, hi = start - (page << PAGE_SHIFT), stop - (page << PAGE_SHIFT)
                    try:
                        self._accept(page, old[:lo] + bytes(hi - lo) + old[hi:])
                    except StoreFull:
                        if not advisory:
                            raise
                page += 1
            if fua:
                self._flush_locked()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Contiguous ``(offset, length, is_hole)`` runs covering the range; holes read as zeros."""
        with self._lock:
            self._check_range(offset, length)
            out: list[tuple[int, int, bool]] = []
            end = offset + length
            with self._meta.env.begin() as txn:
                page = offset >> PAGE_SHIFT
                while (page << PAGE_SHIFT) < end:
                    entry = self._pending.get(page)
                    if entry is not None:
                        hole = entry[0] == ZERO
                    else:
                        hole = txn.get(_pack_u64(page), db=self._meta.map) is None
                    start = max(offset, page << PAGE_SHIFT)
                    stop = min(end, (page + 1) << PAGE_SHIFT)
                    if out and out[-1][2] == hole:
                        out[-1] = (out[-1][0], out[-1][1] + stop - start, hole)
                    else:
                        out.append((start, stop - start, hole))
                    page += 1
            return out

    def commit(self) -> None:
        """Apply the pending batch in one LMDB transaction (not synced): from then on it survives
        a kill of this process. If it fails, the pending pages stay pending."""
        with self._lock:
            self._commit_locked()

    def flush(self) -> None:
        """Make every write accepted so far durable: commit, ``fdatasync`` the backend, sync LMDB,
        then release (and punch) the slots freed since the last flush."""
        with self._lock:
            self._check_writable()
            self._flush_locked()

    # -- internals -------------------------------------------------------------------------------

    def _page_locked(self, page: int) -> bytes:
        return self.read(page << PAGE_SHIFT, PAGE_SIZE)

    def _accept(self, page: int, content: bytes) -> None:
        """Classify a full page and put it in the pending batch, committing first when the batch is
        full or could need more slots than are free."""
        kind, word = classify(content)
        if kind == DATA:
            entry: Pending = (DATA, 0, content)
        elif kind == ZERO:
            entry = _ZERO_PENDING
        else:
            entry = (FILL, word, None)
        previous = self._pending.get(page)
        replaces_data = previous is not None and previous[0] == DATA
        if kind == DATA and not replaces_data and self._pending_data >= self._available:
            self._make_room()
            if self._available == 0:
                # No slot is known free: this page can only land if it dedups. Try it alone.
                self._pending[page] = entry
                self._pending_data += 1
                try:
                    self._commit_locked()
                except StoreFull:
                    del self._pending[page]
                    self._pending_data -= 1
                    raise
                return
            previous = None
            replaces_data = False
        if not self._pending:
            self._pending_since = time.monotonic()
            if self._committer_idle and self._group_commit:  # else it has a deadline already
                self._start_committer()
                self._wake.notify()
        self._pending[page] = entry
        self._pending_data += (kind == DATA) - replaces_data
        if len(self._pending) >= GROUP_PAGES:
            self._commit_locked()

    def _make_room(self) -> None:
        self._commit_locked()
        if self._available == 0 and (self._deferred or self._to_release or self._releasing):
            self._flush_locked(wait=True)

    def _start_committer(self) -> None:
        if self._committer is None or not self._committer.is_alive():
            self._committer = threading.Thread(
                target=self._committer_loop, name="dedupblk-commit", daemon=True
            )
            self._committer.start()

    def _committer_loop(self) -> None:
        """Housekeeping off the request path: commit a batch that waited `GROUP_SECONDS` when no
        request did it first, and punch slots released by a flush (see `_release_deferred`)."""
        with self._lock:
            try:
                self._committer_work()
            finally:
                self._committer_idle = True  # gone: the next batch starts a new one

    def _committer_work(self) -> None:
        while not self._closed:
            if self._to_release:
                self._release_in_background()
            elif self._pending and self._group_commit:
                due = self._pending_since + GROUP_SECONDS - time.monotonic()
                if due <= 0:
                    try:
                        self._commit_locked()
                    except Exception:
                        log.exception("background commit failed; pages stay pending")
                        self._wake.wait(GROUP_SECONDS)
                    continue
                self._wake.wait(due)
            else:
                self._committer_idle = True
                self._wake.wait(1.0)
                self._committer_idle = False

    def _release_in_background(self) -> None:
        """Punch the slots a flush released without holding the lock (requests go on), then make
        them free. Until then they stay in ``deferred``, so nothing can be written to them."""
        slots, self._to_release = self._to_release, []
        self._releasing = set(slots)
        self._lock.release()
        try:
            self._backend.discard(key_int(key) for key in slots)
        except StoreError:
            log.exception("punching freed slots failed; their space is not given back")
        finally:
            self._lock.acquire()
            self._releasing = set()
        if not self._closed:
            self._free_slots(slots)
        self._wake.notify_all()

    def _wait_for_release(self) -> None:
        while self._to_release or self._releasing:
            self._wake.wait()

    def _refresh_available(self) -> None:
        meta = self._meta
        with meta.env.begin() as txn:
            free = self._free_count = meta.entries(txn, meta.free)
            self._deferred = meta.entries(txn, meta.deferred)
        self._available = free + self.config.slot_capacity - self._state.slot_high

    def _flush_locked(self, *, wait: bool = False) -> None:
        """Commit, sync, then release the deferred slots: in the background thread, or here when
        ``wait`` (a caller that needs the slots at once)."""
        if self.readonly or self._closed:
            return
        self._commit_locked()
        self._backend.sync()
        self._meta.sync()
        if wait:
            # Never punch here while the committer punches: it could hit a slot reused meanwhile.
            self._wait_for_release()
        if self._deferred:
            self._release_deferred(background=not wait)

    def _release_deferred(self, *, background: bool) -> None:
        """Punch the deferred slots and make them free. Call only at a durable point: the
        transactions that freed them are synced, so no durable mapping names them."""
        meta = self._meta
        queued = set(self._to_release) | self._releasing
        with meta.env.begin() as txn:
            slots = [
                key
                for key in txn.cursor(db=meta.deferred).iternext(values=False)
                if key not in queued
            ]
        if background:
            self._to_release.extend(slots)
            self._start_committer()
            self._wake.notify_all()
        elif slots:
            self._backend.discard(key_int(key) for key in slots)
            self._free_slots(slots)

    def _free_slots(self, slots: list[bytes]) -> None:
        """Move punched slots from ``deferred`` to ``free`` in one transaction."""
        meta = self._meta

        def release(txn: Any) -> None:
            for key in slots:
                if txn.delete(key, db=meta.deferred):
                    txn.put(key, b"", db=meta.free)

        meta.write(release)
        self._refresh_available()

    def _commit_locked(self) -> None:
        if not self._pending or self._closed:
            return
        batch = self._pending
        applied: list[_Batch] = []

        def body(txn: Any) -> State:
            applied[:] = [_Batch(self, txn)]  # the last try is the one that committed
            return applied[0].apply(batch)

        self._state = self._meta.write(body)
        self._pending = {}
        self._pending_data = 0
        done = applied[0]
        self._available -= done.allocated
        self._free_count = done.free_left
        self._deferred += len(done.dead)
        self._remember_slots(done)
        if self._deferred > DEFERRED_LIMIT:
            self._flush_locked()

    def _remember_slots(self, done: _Batch) -> None:
        """After a commit: forget the slots it freed, remember the ones it wrote or read, and keep
        the cache within `SLOT_CACHE_PAGES` (oldest first out)."""
        cache = self._slot_cache
        for slot in done.dead:
            cache.pop(slot, None)
        cache.update(done.new_data)
        cache.update(done.stored)
        excess = len(cache) - SLOT_CACHE_PAGES
        if excess > 0:
            for slot in list(itertools.islice(cache, excess)):
                del cache[slot]

    def statistics(self) -> Statistics:
        """Usage as of the last commit (pending pages are not counted)."""
        with self._lock:
            return _statistics(self._meta, self.config, self._state)

    def check(self) -> list[Problem]:
        """Commit, then run every named check of `dedupblk.store.check` on this open store.
        Returns the problems found (empty when every invariant holds)."""
        from .check import run_checks  # noqa: PLC0415  (check imports this module)

        with self._lock:
            self._commit_locked()
            return run_checks(self._meta, self._backend, self.path).problems


# Outcomes of looking a page's fingerprint up (`_Batch._dedup_target`).
_HIT, _NEW, _FULL, _COLLISION = range(4)


class _Batch:
    """One commit: applies pending pages to the map, refcounts, index and free slots inside one
    write transaction. Page data for new slots is written to the backend before `apply` returns,
    that is before the transaction commits (write order steps 1-2 of the format spec).

    Refcount changes are summed per slot and written once at the end, so a page's new reference
    is always counted before its old one is dropped, and a batch full of duplicates reads and
    writes each shared slot's refcount once."""

    def __init__(self, store: Store, txn: Any) -> None:
        self.txn = txn
        self.meta = store._meta
        self.backend = store._backend
        self.config = store.config
        self.fingerprint = store._fingerprint
        self.bounded = self.config.max_index_entries > 0
        old = store._state
        self.state = State(old.slot_high, old.mapped_pages, old.same_filled_pages, old.next_seq, 0)
        self.new_data: dict[int, bytes] = {}  # slot -> page, for slots allocated in this batch
        self.new_refs: dict[int, bytes] = {}  # slot -> fingerprint, likewise
        self.deltas: dict[int, int] = {}  # slot -> refcount change in this batch
        # slot -> (refcount, fingerprint) before this batch, read lazily
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.targets: dict[bytes, tuple[int, bytes | None]] = {}  # fp -> (slot, index record)
        self.stored: dict[int, bytes] = {}  # slot -> bytes read for verification
        self.cache = store._slot_cache  # committed slots' contents (read-only here)
        self.allocated = 0  # slots taken from the free ones or the never-used ones
        self.dead: list[int] = []  # slots whose last reference this batch dropped
        self.free_cursor: Any = None
        self.free_left = store._free_count
        self.index_entries = self.meta.entries(txn, self.meta.index) if self.bounded else 0
        # Lookups through cursors: cheaper than txn.get(..., db=...) per call.
        self.refs_get = txn.cursor(db=self.meta.refs).get
        self.index_get = txn.cursor(db=self.meta.index).get

    def apply(self, batch: dict[int, Pending]) -> State:
        txn, state, deltas = self.txn, self.state, self.deltas
        # A cursor's calls cost less than the transaction's (no database argument), and
        # `replace` writes a record and returns the old one in a single tree descent.
        map_cursor = txn.cursor(db=self.meta.map)
        get, replace, pop = map_cursor.get, map_cursor.replace, map_cursor.pop
        fingerprint, targets, index_get = self.fingerprint, self.targets, self.index_get
        committed, refs_get, max_share = self.committed, self.refs_get, self.config.max_share
        new_data, stored, cache = self.new_data, self.stored, self.cache
        for page in sorted(batch):
            kind, word, content = batch[page]
            key = _pack_u64(page)
            if kind == ZERO:
                raw_old = pop(key)
            elif kind == FILL:
                raw_old = replace(key, _pack_map(KIND_FILL, word))
                state.same_filled_pages += 1  # a rewrite of the same word nets out below
            else:
                assert content is not None
                fp = fingerprint(content)
                # The dedup target: the indexed slot, if it holds these very bytes (never trust
                # a fingerprint alone) and may take one more reference.
                known = targets.get(fp)
                if known is None:
                    raw = index_get(fp)
                    known = targets[fp] = (_unpack_index(raw)[0] if raw else 0, raw)
                target = known[0]
                outcome = _NEW
                if target:
                    held = new_data.get(target) or stored.get(target) or cache.get(target)
                    if held is None:
                        held = stored[target] = self.backend.read_slot(target)
                    if held != content:
                        outcome = _COLLISION
                    else:
                        ref = committed.get(target)
                        if ref is None:
                            raw = refs_get(_pack_u64(target))
                            ref = committed[target] = _unpack_ref(raw) if raw else (0, fp)
                        if ref[0] + deltas.get(target, 0) < max_share:
                            outcome = _HIT
                        else:
                            outcome = _FULL
                            raw_old = get(key)
                            if raw_old == _pack_map(KIND_SLOT, target):
                                continue  # already shares it: no new reference needed
                if outcome == _HIT:
                    record = _pack_map(KIND_SLOT, target)
                    raw_old = replace(key, record)
                    if raw_old == record:
                        continue  # rewrote the content the page already had
                    deltas[target] = deltas.get(target, 0) + 1
                else:
                    target = self._store_new(fp, content, outcome)
                    raw_old = replace(key, _pack_map(KIND_SLOT, target))
                state.mapped_pages += 1
            if raw_old is None:
                continue
            old_kind, old_value = _unpack_map(raw_old)
            if old_kind == KIND_SLOT:
                state.mapped_pages -= 1
                deltas[old_value] = deltas.get(old_value, 0) - 1
            elif old_kind == KIND_FILL:
                state.same_filled_pages -= 1
        self._apply_refcounts()
        if self.bounded and self.index_entries > self.config.max_index_entries:
            self._prune_index()
        if new_data:
            self.backend.write_slots(list(new_data.items()))
        txn.put(KEY_STATE, state.pack(), db=self.meta.info)
        return state

    def _store_new(self, fp: bytes, content: bytes, outcome: int) -> int:
        """Put ``content`` in a newly allocated slot. A new fingerprint, or one whose slot reached
        max-share, makes the new slot the dedup target; a collision keeps the indexed one."""
        slot = self._allocate()
        self.new_data[slot] = content
        self.new_refs[slot] = fp
        self.deltas[slot] = 1
        self.committed[slot] = (0, fp)
        if outcome != _COLLISION:
            raw_old = self.targets[fp][1]
            raw_new = self._index(fp, slot, raw_old)
            self.targets[fp] = (slot, raw_new)
        return slot

    def _apply_refcounts(self) -> None:
        txn, meta = self.txn, self.meta
        refsdb = meta.refs
        for slot, delta in self.deltas.items():
            key = _pack_u64(slot)
            new_fp = self.new_refs.get(slot)
            if new_fp is not None:
                txn.put(key, _pack_ref(delta, new_fp), db=refsdb)
                continue
            if not delta:
                continue
            ref = self.committed.get(slot)
            refcount, fp = ref if ref is not None else _unpack_ref(txn.get(key, db=refsdb))
            if refcount + delta > 0:
                txn.put(key, _pack_ref(refcount + delta, fp), db=refsdb)
                continue
            # Last reference: the slot's death, its index entry and its deferred free commit
            # together.
            txn.delete(key, db=refsdb)
            raw_index = txn.get(fp, db=meta.index)
            if raw_index is not None:
                indexed_slot, seq = _unpack_index(raw_index)
                if indexed_slot == slot:
                    txn.delete(fp, db=meta.index)
                    if self.bounded:
                        txn.delete(_pack_u64(seq), db=meta.age)
                        self.index_entries -= 1
            txn.put(key, b"", db=meta.deferred)
            self.dead.append(slot)

    def _index(self, fp: bytes, slot: int, raw_old: bytes | None) -> bytes:
        txn, meta, state = self.txn, self.meta, self.state
        seq = state.next_seq
        state.next_seq += 1
        raw = _pack_index(slot, seq)
        txn.put(fp, raw, db=meta.index)
        if self.bounded:
            if raw_old is not None:
                txn.delete(_pack_u64(_unpack_index(raw_old)[1]), db=meta.age)
            else:
                self.index_entries += 1
            txn.put(_pack_u64(seq), fp, db=meta.age)
        return raw

    def _prune_index(self) -> None:
        """Drop the oldest index entries of singly-referenced slots until the index is a little
        under its bound (the slots and their mappings stay; the pages stop being dedup targets).
        Entries of shared slots are kept, so a bound smaller than the shared slots is exceeded."""
        txn, meta = self.txn, self.meta
        limit = self.config.max_index_entries
        target = limit - max(1, limit // 32)
        cursor = txn.cursor(db=meta.age)
        if not cursor.first():
            return
        while self.index_entries > target:
            if not cursor.key():  # a delete of the last record leaves the cursor past the end
                return
            fp = cursor.value()
            raw_index = txn.get(fp, db=meta.index)
            if raw_index is None:  # cannot happen while the age invariant holds; heal it anyway
                if not cursor.delete():
                    return
                continue
            slot = _unpack_index(raw_index)[0]
            refcount = _unpack_ref(txn.get(_pack_u64(slot), db=meta.refs))[0]
            if refcount == 1:
                txn.delete(fp, db=meta.index)
                self.index_entries -= 1
                if not cursor.delete():
                    return
            elif not cursor.next():
                return

    def _allocate(self) -> int:
        """A slot no committed mapping names: a free slot (never one freed since the last flush:
        those are deferred), else a never-used slot. `StoreFull` when there is none."""
        state = self.state
        # The store counts its free slots: no lookup while it knows there are none (and a last
        # look before giving up, should the count be behind).
        if self.free_left or state.slot_high >= self.config.slot_capacity:
            if self.free_cursor is None:
                self.free_cursor = self.txn.cursor(db=self.meta.free)
            cursor = self.free_cursor
            if cursor.first():
                slot: int = U64BE.unpack(cursor.key())[0]
                cursor.delete()
                self.allocated += 1
                self.free_left = max(0, self.free_left - 1)
                return slot
        if state.slot_high < self.config.slot_capacity:
            state.slot_high += 1
            self.allocated += 1
            return state.slot_high - 1
        raise StoreFull(f"no free slot in backend {self.backend.path}")


def _statistics(meta: Meta, config: Config, state: State) -> Statistics:
    with meta.env.begin() as txn:
        stored = meta.entries(txn, meta.refs)
        index_entries = meta.entries(txn, meta.index)
    mapped = state.mapped_pages
    return Statistics(
        size_bytes=config.size,
        page_size=config.page_size,
        mapped_pages=mapped,
        same_filled_pages=state.same_filled_pages,
        stored_pages=stored,
        index_entries=index_entries,
        dedup_ratio=mapped / stored if stored else 1.0,
        saved_bytes=(mapped + state.same_filled_pages - stored) * config.page_size,
        data_bytes=stored * config.page_size,
        metadata_bytes=meta.used_bytes(),
    )


def read_statistics(path: str | os.PathLike[str]) -> tuple[Config, Statistics]:
    """Statistics as of the last commit, without taking the store's lock: works while another
    process serves the store (LMDB readers see the last committed state)."""
    store_dir = os.fspath(path)
    if not os.path.isdir(store_dir):
        raise NotAStore(f"{store_dir}: no such store")
    opened = Meta.opened(store_dir)
    if opened is not None:  # LMDB allows one environment per file per process
        config, state = opened.read_header(store_dir)
        return config, _statistics(opened, config, state)
    meta = Meta(store_dir, readonly=True)
    try:
        config, state = meta.read_header(store_dir)
        return config, _statistics(meta, config, state)
    finally:
        meta.close()
