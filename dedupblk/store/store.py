"""The `Store` API: a block device of 4 KiB pages over refcounted, deduplicated slots.

The on-disk format, its invariants and the write order are specified once in
`dedupblk.store.format`. This module implements them.

Group commit: `Store.write` classifies pages and keeps them in a bounded buffer of pending pages
(`GROUP_PAGES` pages or `GROUP_SECONDS` seconds, whichever comes first), which the committer thread
applies in one LMDB write transaction each (`dedupblk.store.batch`). A full buffer is handed over
and a new one fills while the committer works: at most one full buffer waits, so at most three
are in memory. The committer syncs (data, then metadata: the format's write order) without the
store's lock, so requests go on meanwhile; they see every page handed over. `Store.commit` and
`Store.flush` wait until everything accepted is committed (flush: and durable). A caller that
commits every batch itself (the ublk server over a volatile store, once per pass) opens the store
with ``group_commit=False``: no committer thread then, and each commit runs in its thread. A
kill of the process loses only pages not yet committed, which read back afterwards as their old
content.

A commit that cannot write its new slot data (a full filesystem, an I/O error) still commits every
page that needs no new data (trims, zeroes, fills, duplicates), drops the rest (they read as their
old content again: nothing that failed stays in memory) and raises; the next `flush` raises too,
as a disk reports a failed write-back at the next cache flush. A failed sync cannot be taken back
(Linux may have dropped the pages): the store then refuses every write and flush until reopened.

Every public method takes the store's lock, so any thread may call any method.

Timings: a `StoreObserver` given to `open_store` is told how long each commit and each flush
took (a frontend's latency histograms, `dedupblk.metrics`); the store knows nothing of metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

from ..errors import (
    BackendError,
    BackendMismatch,
    DataLost,
    DedupblkError,
    InvalidRequest,
    NotAStore,
    ReadOnlyStore,
    StoreError,
    StoreFull,
    SyncFailed,
)
from ..fsinfo import in_memory
from .backend import Backend
from .batch import Batch, Pending, SlotCounts, WriteFailed
from .check import CheckResult, Progress, damaged_structure, run_checks
from .fingerprint import DATA, ZERO, ZERO_PAGE, FingerprintFn, classify, fill_page, xxh3_128
from .format import (
    DATA_FILE,
    FILL_ENTRY,
    KEY_STATE,
    LOST_ENTRY,
    MAP_CHUNK_PAGES,
    MAP_KEY,
    META_DIR,
    PAGE_SHIFT,
    PAGE_SIZE,
    REF_CHUNK_SLOTS,
    U64BE,
    U64LE,
    VOLUME,
    fill_key,
    map_key,
)
from .lock import StoreLock
from .meta import METADATA_ERRORS, Meta, damaged_metadata, raise_damaged, refuse_truncated
from .stats import Statistics, statistics_of

log = logging.getLogger(__name__)

GROUP_PAGES = 1024  # pages buffered before a commit (4 MiB)
GROUP_SECONDS = 0.05  # longest a buffered page waits for its commit
SLOT_CACHE_PAGES = 1024  # slot contents kept for verifying duplicates and for reads (4 MiB)
LOG_INTERVAL_SECONDS = 10.0  # a repeated failure is logged at most this often
# Released slots a durable store keeps unpunched, at most (16 MiB of backend space): they are
# punched at the next flush, or all at once when there are more. Random overwrites free slots
# that are no run in the backend, one `fallocate` each; a slot that is written again first is
# never punched at all.
UNPUNCHED_LIMIT = 4096
_U32_AT = struct.Struct("<I").unpack_from
_pack_map_key = MAP_KEY.pack


class StoreObserver(Protocol):
    """Told the duration of each commit and flush (`open_store`'s ``observer``).

    Called with the store's lock held, from whichever thread committed or flushed (the committer
    thread too), also when the commit or flush failed: must be quick, must not raise and must
    not call the store.
    """

    def committed(self, seconds: float) -> None:
        """One batch was committed (or failed to be) in ``seconds``, its data sync included."""
        ...

    def flushed(self, seconds: float) -> None:
        """One flush (commit, then make it durable) took ``seconds``."""
        ...


def open_store(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    fingerprint: FingerprintFn | None = None,
    group_commit: bool | None = True,
    slot_cache_pages: int = SLOT_CACHE_PAGES,
    observer: StoreObserver | None = None,
) -> Store:
    """Open a store: exclusively for writing, or shared with other read-only openers.

    ``fingerprint`` replaces XXH3-128 (tests inject colliding functions to prove that verify keeps
    different pages apart). ``group_commit=False`` is for a caller that commits every batch
    itself: no background thread then commits on a timer, so none competes with the request
    path. ``group_commit=None``: group commit in a durable store only, whose commits each wait
    for the disk (the ublk server: a volatile store's caller commits every pass itself).
    ``slot_cache_pages`` bounds the slot contents kept in
    memory (a server whose memory is locked keeps fewer). ``observer`` is told how long each
    commit and flush takes (see `StoreObserver`). Use as a context manager; `Store.close`
    flushes.
    """
    return Store(
        os.fspath(path),
        readonly=readonly,
        fingerprint=fingerprint or xxh3_128,
        group_commit=group_commit,
        slot_cache_pages=slot_cache_pages,
        observer=observer,
    )


class _RateLimited:
    """Log a recurring failure once, then at most every `LOG_INTERVAL_SECONDS` with a count."""

    def __init__(self) -> None:
        self._last = 0.0
        self._suppressed = 0

    def error(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < LOG_INTERVAL_SECONDS:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.error(message + more, *args)
        self._last, self._suppressed = now, 0


class Store:
    """An open store. See the module docstring for batching and `dedupblk.store.format` for
    what survives a crash."""

    def __init__(
        self,
        store_dir: str,
        *,
        readonly: bool,
        fingerprint: FingerprintFn,
        group_commit: bool | None = True,
        slot_cache_pages: int = SLOT_CACHE_PAGES,
        observer: StoreObserver | None = None,
        verify_structure: bool = False,
    ) -> None:
        if not os.path.isfile(os.path.join(store_dir, META_DIR, "data.mdb")):
            kind = "no such store" if not os.path.exists(store_dir) else "not a dedupblk store"
            raise NotAStore(f"{store_dir}: {kind}")
        self.path = store_dir
        self.readonly = readonly
        self._fingerprint = fingerprint
        self._lock = threading.RLock()
        self._closed = False
        self._file_lock = StoreLock(store_dir, exclusive=not readonly)
        try:
            if verify_structure:  # before a writer's open commits anything into the file
                refuse_truncated(store_dir)  # its own message: the file is short, not scrambled
                damaged = damaged_structure(os.path.join(store_dir, META_DIR))
                if damaged is not None:
                    raise _Unrepairable(damaged)
            self.volatile, self._meta, self._backend = self._open_files(store_dir, readonly)
        except BaseException:
            self._file_lock.release()
            raise
        self.config, self._state = self._meta.read_header()
        self.backend_path = self._backend.path
        self.size = self.config.size
        self._pending: dict[int, Pending] = {}
        self._pending_data = 0  # DATA pages in _pending: each may need one slot
        self._pending_since = 0.0
        self._sealed: list[dict[int, Pending]] = []  # full buffers handed to the committer
        self._committing: dict[int, Pending] | None = None  # the one it commits now
        self._inflight_data = 0  # DATA pages in those: each may need one slot too
        self._sealed_count = 0  # buffers handed over so far,
        self._committed_count = 0  # and how many of them the committer is done with
        self._counts = SlotCounts(self.config.slot_capacity)
        # Slots freed by the last commit, released after the next one (durable stores).
        self._cooling: list[int] = []
        self._unsynced = False  # a commit whose meta page is not known durable yet
        self._write_error: DedupblkError | None = None  # for the next flush
        self._broken: DedupblkError | None = None  # a failed sync: refuse until reopened
        self._log = _RateLimited()
        self._committer: threading.Thread | None = None
        self._committer_idle = True  # it waits with no deadline: a new batch must wake it
        self._applying: Batch | None = None  # the batch a commit applies now, until it returns
        # Commit a batch GROUP_SECONDS old in the background (see `open_store`).
        self._group_commit = self.volatile is None if group_commit is None else group_commit
        # Slot contents recently written or read for verification, so that a duplicate of a hot
        # page is verified without a read from the backend (bounded; see `_remember_slots`).
        self._slot_cache: dict[int, bytes] = {}
        self._slot_cache_pages = slot_cache_pages
        self._observer = observer
        self._wake = threading.Condition(self._lock)
        if not readonly:
            try:
                self._open_for_writing()
            except BaseException:
                self._release_files()
                raise

    @staticmethod
    def _open_files(store_dir: str, readonly: bool) -> tuple[str | None, Meta, Backend]:
        """Open the metadata and the backend: (why the store is volatile, or None; both).

        Where the metadata is decides how LMDB is opened; where the slots are is only known from
        the config, so a store whose slots alone are in RAM has its metadata opened again."""
        volatile = None if readonly else in_memory(os.path.join(store_dir, META_DIR))
        meta = Meta(store_dir, readonly=readonly, durable=volatile is None)
        backend: Backend | None = None
        try:
            config = meta.read_header()[0]
            backend_path = config.backend or os.path.join(store_dir, DATA_FILE)
            if not readonly and volatile is None:
                volatile = in_memory(backend_path)
                if volatile is not None:
                    meta.close()
                    meta = Meta(store_dir, readonly=False, durable=False)
            backend = Backend(backend_path, readonly=readonly)
            backend.check_header(config.uuid)
            if backend.capacity_slots() < config.slot_capacity:
                raise BackendMismatch(
                    f"backend {backend_path} is smaller than when the store was created"
                )
        except BaseException:
            if backend is not None:
                backend.close()
            meta.close()
            raise
        return volatile, meta, backend

    def _release_files(self) -> None:
        self._backend.close()
        self._meta.close()
        self._file_lock.release()

    # -- life cycle ------------------------------------------------------------------------------

    def _open_for_writing(self) -> None:
        """Make what a killed predecessor committed durable, count the free slots, give back
        the space of free slots if the store was not closed cleanly, and mark it in use."""
        meta = self._meta
        self._backend.sync()
        meta.sync()
        self._count_slots(give_back=not self._state.clean)
        self._state.clean = 0
        meta.write(lambda txn: txn.put(KEY_STATE, self._state.pack(), db=meta.info))
        meta.sync()

    def _count_slots(self, *, give_back: bool) -> None:
        """Count the free slots of every refs chunk afresh; with ``give_back``, punch (discard)
        every free slot too: a killed server may have freed slots it never released, whose old
        data still takes space (zram: memory)."""
        meta, counts = self._meta, SlotCounts(self.config.slot_capacity)
        give_back = give_back and self._backend.punches
        capacity = self.config.slot_capacity
        with damaged_metadata(self.path), meta.env.begin(buffers=True) as txn:
            present = txn.cursor(db=meta.refs)
            record = present.first()
            for chunk in range(len(counts.free_in_chunk)):
                refs = None
                while record and len(present.key()) != U64BE.size:  # `check` reports these
                    record = present.next()
                if record and U64BE.unpack(present.key())[0] == chunk:
                    refs = bytes(present.value())
                    record = present.next()
                counts.count_chunk(chunk, refs)
                if give_back:
                    first = chunk * REF_CHUNK_SLOTS
                    end = min(capacity, first + REF_CHUNK_SLOTS)
                    self._discard(
                        [
                            s
                            for s in range(max(1, first), end)
                            if refs is None or not refs[s - first]
                        ]
                    )
        self._counts = counts

    def close(self) -> None:
        """Flush everything, wait for the committer and release the store. Idempotent. If the
        final flush fails the store is still released, and the error raised."""
        failure: BaseException | None = None
        with self._lock:
            if self._closed:
                return
            try:
                if not self.readonly and self._broken is None:
                    self._flush_locked()
                    self._wait_for_no_batch()
                    self._state.clean = 1
                    meta = self._meta
                    meta.write(lambda txn: txn.put(KEY_STATE, self._state.pack(), db=meta.info))
                    meta.sync()
            except BaseException as exc:  # noqa: BLE001 -- raised once the store is released
                failure = exc
            finally:
                self._closed = True
                self._wake.notify_all()
                committer = self._committer
        try:
            if committer is not None and committer is not threading.current_thread():
                committer.join()
        finally:
            with self._lock:
                self._release_files()
        if failure is not None:
            raise failure

    @property
    def commits_in_background(self) -> bool:
        """Whether the committer commits accepted writes by itself (group commit), not only
        `commit` and `flush`."""
        return self._group_commit

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
        if self._broken is not None:
            raise BackendError(f"{self._broken} earlier; reopen the store") from self._broken

    def read(self, offset: int, length: int) -> bytes:
        """The device's bytes ``[offset, offset + length)``; unwritten bytes read as zeros.
        `DataLost` (EIO) if a page in the range was found damaged by ``check --repair``."""
        with self._lock:
            if offset < 0 or length <= 0 or offset + length > self.size or self._closed:
                self._check_range(offset, length)
                if length == 0:
                    return b""
            first = offset >> PAGE_SHIFT
            last = (offset + length - 1) >> PAGE_SHIFT
            try:
                if first == last:
                    data = self._page(first, None)
                else:
                    chunk: list[Any] = [None, -1]  # a map chunk the pages share, and its number
                    data = b"".join([self._page(page, chunk) for page in range(first, last + 1)])
            except METADATA_ERRORS as exc:  # `damaged_metadata`, without its calls
                raise_damaged(self.path, exc)
            start = offset - (first << PAGE_SHIFT)
            if start == 0 and length == len(data):
                return data
            return data[start : start + length]

    def _uncommitted(self, page: int) -> Pending | None:
        """The newest accepted, not yet committed content of ``page``, if any."""
        entry = self._pending.get(page)
        if entry is None and (self._sealed or self._committing is not None):
            for batch in (*reversed(self._sealed), self._committing or {}):
                entry = batch.get(page)
                if entry is not None:
                    break
        return entry

    def _page(self, page: int, shared: list[Any] | None) -> bytes:
        """One page's bytes; ``shared`` keeps the last map chunk read, for the next page."""
        entry = self._pending.get(page)
        if entry is None and (self._sealed or self._committing is not None):
            entry = self._uncommitted(page)
        if entry is not None:
            return entry[2] or (fill_page(entry[1]) if entry[1] else ZERO_PAGE)
        meta = self._meta
        chunk_no = page // MAP_CHUNK_PAGES
        if shared is not None and shared[1] == chunk_no:
            chunk = shared[0]
        else:
            chunk = meta.reader().get(_pack_map_key(VOLUME, chunk_no), db=meta.map)
            if shared is not None:
                shared[0], shared[1] = chunk, chunk_no
        if chunk is None:
            return ZERO_PAGE
        value: int = _U32_AT(chunk, (page - chunk_no * MAP_CHUNK_PAGES) * 4)[0]
        if value == 0:
            return ZERO_PAGE
        if value >= LOST_ENTRY:
            if value == FILL_ENTRY:
                raw = meta.reader().get(fill_key(page), db=meta.fills)
                if raw is not None:
                    return fill_page(U64LE.unpack(raw)[0])
            raise DataLost(
                f"page {page} (bytes {page << PAGE_SHIFT}-{((page + 1) << PAGE_SHIFT) - 1}) was "
                "found damaged by check --repair; write or trim it"
            )
        return self._slot_cache.get(value) or self._backend.read_slot(value)

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
            if (
                self.readonly
                or self._broken is not None
                or offset < 0
                or offset + length > self.size
                or self._closed
            ):
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
                if take < PAGE_SIZE:
                    with damaged_metadata(self.path):
                        old = self._page(page, None)
                    content = old[:in_page] + bytes(view[pos : pos + take]) + old[in_page + take :]
                    self._accept(page, content)
                    page += 1
                else:
                    take = (length - pos) & ~(PAGE_SIZE - 1)
                    self._accept_pages(page, view, pos, take >> PAGE_SHIFT)
                    page += take >> PAGE_SHIFT
                pos += take
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
                    try:
                        with damaged_metadata(self.path):
                            old = self._page(page, None)
                    except DataLost:
                        if advisory:
                            page += 1
                            continue
                        raise
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
            meta = self._meta
            with damaged_metadata(self.path):
                txn = meta.reader()
                chunk_no, chunk = -1, None
                page = offset >> PAGE_SHIFT
                while (page << PAGE_SHIFT) < end:
                    entry = self._uncommitted(page)
                    if entry is not None:
                        hole = entry[0] == ZERO
                    else:
                        if page // MAP_CHUNK_PAGES != chunk_no:
                            chunk_no = page // MAP_CHUNK_PAGES
                            chunk = txn.get(map_key(chunk_no), db=meta.map)
                        at = (page % MAP_CHUNK_PAGES) * 4
                        hole = chunk is None or _U32_AT(chunk, at)[0] == 0
                    start = max(offset, page << PAGE_SHIFT)
                    stop = min(end, (page + 1) << PAGE_SHIFT)
                    if out and out[-1][2] == hole:
                        out[-1] = (out[-1][0], out[-1][1] + stop - start, hole)
                    else:
                        out.append((start, stop - start, hole))
                    page += 1
            return out

    def commit(self) -> None:
        """Apply the pending batch in one LMDB transaction: from then on it survives a kill of
        this process. See the module docstring for what a failed commit leaves; its error is
        the caller's, who answers for every pending page, so no later flush repeats it."""
        with self._lock:
            if self._broken is not None:
                self._check_writable()
            try:
                self._commit_locked()
            except DedupblkError:
                self._write_error = None  # this caller hears of it
                raise
            error, self._write_error = self._write_error, None  # a handed-over batch failed
            if error is not None:
                raise error

    def flush(self) -> None:
        """Make every write accepted so far durable: commit, then make that commit durable. On
        a read-only store there is nothing to make durable. Raises the error of a commit that
        failed since the last flush (the writes it dropped were not made durable)."""
        with self._lock:
            if self.readonly:
                return
            self._check_writable()
            self._flush_locked()

    # -- internals -------------------------------------------------------------------------------

    def _accept(self, page: int, content: bytes) -> None:
        """Classify a full page and put it in the pending batch, committing first when the batch is
        full or could need more slots than are free."""
        entry = classify(content)
        data = 1 if entry[0] == DATA else 0  # slots it may need
        pending = self._pending
        previous = pending.get(page)
        if previous is not None and previous[0] == DATA:
            data -= 1  # it takes the place of a page that may need a slot
        elif data and self._pending_data + self._inflight_data >= self._counts.total:
            if not self._make_room_for(page, entry):
                return
            pending = self._pending
            previous = pending.get(page)
            if previous is not None and previous[0] == DATA:
                data -= 1
        if not pending:
            self._pending_since = time.monotonic()
        if self._committer_idle and self._group_commit:  # else it has a deadline already
            self._start_committer()
            self._wake.notify()
        pending[page] = entry
        self._pending_data += data
        if len(pending) >= GROUP_PAGES:
            self._buffer_full()

    def _buffer_full(self) -> None:
        """The pending buffer holds `GROUP_PAGES`: hand it over (one full buffer waits for the
        committer), or commit it."""
        if self._pipelined():
            self._wait_for_committer(lambda: not self._sealed)
            self._seal()
        else:
            self._commit_locked()

    def _make_room_for(self, page: int, entry: Pending) -> bool:
        """Commit until there is room for one more DATA page (True), or, when no slot is known
        free, commit the page alone (False): it can only land if it dedups."""
        while True:
            self._make_room()  # other writers may fill the room while it waits: look again
            if self._counts.total == 0:
                self._pending[page] = entry
                self._pending_data += 1
                try:
                    self._commit_locked()
                except DedupblkError:
                    self._write_error = None  # this caller hears of it
                    raise
                error, self._write_error = self._write_error, None
                if error is not None:
                    raise error
                return False
            previous = self._pending.get(page)
            if (previous is not None and previous[0] == DATA) or (
                self._pending_data + self._inflight_data < self._counts.total
            ):
                return True

    def _accept_pages(self, page: int, data: bytes | memoryview, pos: int, count: int) -> None:
        """`_accept` the ``count`` whole pages of ``data`` from byte ``pos`` on, as pages
        ``page`` and on. What `_accept` checks for each page is checked once for as many pages
        as fit (the buffer's bound, a free slot for each): a large write is this loop."""
        done = 0
        while done < count:
            pending = self._pending
            run = min(count - done, GROUP_PAGES - len(pending))
            if run <= 0 or self._pending_data + self._inflight_data + run > self._counts.total:
                at = pos + (done << PAGE_SHIFT)
                self._accept(page + done, bytes(data[at : at + PAGE_SIZE]))  # room, one by one
                done += 1
                continue
            if not pending:
                self._pending_since = time.monotonic()
            if self._committer_idle and self._group_commit:
                self._start_committer()
                self._wake.notify()
            added = 0
            at = pos + (done << PAGE_SHIFT)
            for n in range(page + done, page + done + run):
                previous = pending.get(n)
                if previous is not None and previous[0] == DATA:
                    added -= 1
                entry = pending[n] = classify(bytes(data[at : at + PAGE_SIZE]))
                if entry[0] == DATA:
                    added += 1
                at += PAGE_SIZE
            self._pending_data += added
            done += run
            if len(pending) >= GROUP_PAGES:
                self._buffer_full()

    def _make_room(self) -> None:
        self._commit_locked()
        if self._counts.total == 0 and self._cooling:
            self._flush_locked()  # a durable point releases the slots the last commit freed

    def _start_committer(self) -> None:
        if self._committer is None or not self._committer.is_alive():
            self._committer_idle = False
            self._committer = threading.Thread(
                target=self._committer_loop, name="dedupblk-commit", daemon=True
            )
            self._committer.start()

    def _pipelined(self) -> bool:
        """Whether commits are the committer thread's (see the module docstring): in a durable
        store, whose commits wait for the disk. A volatile store's are all work for the CPU, which
        a second thread would only share (the GIL)."""
        return (
            self._group_commit
            and self.volatile is None
            and threading.current_thread() is not self._committer
        )

    def _seal(self) -> None:
        """Hand the pending buffer to the committer."""
        if self._pending:
            self._sealed.append(self._pending)
            self._sealed_count += 1
            self._inflight_data += self._pending_data
            self._pending, self._pending_data = {}, 0
            self._start_committer()
            self._wake.notify_all()

    def _wait_for_committer(self, done: Callable[[], bool]) -> None:
        """Wait (the lock let go) until ``done()``, starting a committer anew if one died."""
        while not done() and not self._closed:
            if self._committer is None or not self._committer.is_alive():
                self._start_committer()
            self._wake.wait(1.0)

    def _wait_for_no_batch(self) -> None:
        """Wait (the lock let go) until the committer commits no batch and none waits for it,
        before a write transaction of another thread: a batch another thread handed over since
        this one's flush may be between its commit and `_committed` (its syncs run without the
        lock), and a state record written then would be the one before that batch."""
        self._wait_for_committer(lambda: self._committing is None and not self._sealed)

    def _committer_loop(self) -> None:
        """Commit what is handed over, and a buffer that waited `GROUP_SECONDS` when no request
        filled it first."""
        with self._lock:
            try:
                while not self._closed:
                    if self._sealed:
                        self._commit_sealed()
                    elif self._pending and self._group_commit and self._broken is None:
                        due = self._pending_since + GROUP_SECONDS - time.monotonic()
                        if due > 0:
                            self._wake.wait(due)
                        elif self.volatile is None:
                            self._seal()
                        else:
                            batch = self._take_pending()
                            with contextlib.suppress(DedupblkError):  # reported at the next flush
                                self._commit_batch(batch, unlock=False)
                    else:
                        self._committer_idle = True
                        self._wake.wait(1.0)
                        self._committer_idle = False
            finally:
                self._committer_idle = True  # gone: the next batch starts a new one
                self._wake.notify_all()

    def _commit_sealed(self) -> None:
        batch = self._committing = self._sealed.pop(0)
        data = sum(1 for entry in batch.values() if entry[0] == DATA)
        try:
            with contextlib.suppress(DedupblkError):  # recorded for the next commit or flush
                self._commit_batch(batch, unlock=True)
        finally:
            self._committing = None
            self._committed_count += 1
            self._inflight_data -= data
            self._wake.notify_all()

    def _take_pending(self) -> dict[int, Pending]:
        batch = self._pending
        self._pending, self._pending_data = {}, 0
        return batch

    def _commit_locked(self) -> None:
        """Commit everything accepted so far; return once it is committed (by the committer, in
        a pipelined store: the batches handed over until now, not those handed over later)."""
        if self._closed:
            return
        if self._pipelined():
            self._seal()
            target = self._sealed_count
            self._wait_for_committer(lambda: self._committed_count >= target)
            return
        if self._pending:
            self._commit_batch(self._take_pending(), unlock=False)

    def _commit_batch(self, batch: dict[int, Pending], *, unlock: bool) -> None:
        """Commit ``batch``, timed for the observer."""
        if self._observer is None:
            self._commit_batch_untimed(batch, unlock=unlock)
            return
        start = time.perf_counter()
        try:
            self._commit_batch_untimed(batch, unlock=unlock)
        finally:
            self._observer.committed(time.perf_counter() - start)

    def _commit_batch_untimed(self, batch: dict[int, Pending], *, unlock: bool) -> None:
        """Commit ``batch``. A batch that fails is not kept: the pages it could not commit read
        as what was committed before them, and the error is the caller's and the next commit's
        or flush's (see the module docstring). After a failed sync nothing more is committed."""
        if self._broken is not None:
            self._record(self._broken)
            raise self._broken
        try:
            done = self._apply(batch, new_data=True, unlock=unlock)
        except (WriteFailed, StoreFull) as failed:
            # The new slot data could not be written (or had no slot): commit what needs none.
            error = failed.error if isinstance(failed, WriteFailed) else failed
            self._record(error)
            if self._broken is None:
                try:
                    done = self._apply(batch, new_data=False, unlock=unlock)
                except DedupblkError as again:
                    self._record(again)
                    raise again from error
                self._committed(done)
                lost = len(batch) - done.applied
                self._log.error("a commit failed, %d of %d pages dropped: %s", lost,
                                len(batch), error)  # fmt: skip
            raise error from None
        except DedupblkError as exc:
            self._record(exc)
            self._log.error("a commit failed, %d pages dropped: %s", len(batch), exc)
            raise
        except Exception as exc:
            error = BackendError(f"a commit failed unexpectedly: {exc!r}")
            self._record(error)
            log.exception("a commit failed unexpectedly, %d pages dropped", len(batch))
            raise error from exc
        self._committed(done)

    def _record(self, error: DedupblkError) -> None:
        """Keep the first error since the last flush, for it to report."""
        self._write_error = self._write_error or error

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """The committer's syncs, without the store's lock (it holds it once)."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def _apply(self, batch: dict[int, Pending], *, new_data: bool, unlock: bool) -> Batch:
        """Run one commit of ``batch``; with ``new_data`` False, pages that would need a new slot
        are left out. With ``unlock``, the syncs run without the store's lock."""
        meta = self._meta
        applied: list[Batch] = []
        durable = self.volatile is None

        def sync_data() -> None:
            if durable and applied[0].new_data:
                try:
                    self._backend.sync()  # the data before the commit that maps it
                except DedupblkError as exc:
                    raise WriteFailed(exc) from exc

        def body(txn: Any) -> None:
            applied[:] = [
                Batch(
                    txn,
                    meta=meta,
                    backend=self._backend,
                    config=self.config,
                    state=self._state,
                    fingerprint=self._fingerprint,
                    slot_cache=self._slot_cache,
                    counts=self._counts,
                    start_writeback=durable,
                    new_data=new_data,
                )
            ]  # the last try is the one that commits
            self._applying = applied[0]
            applied[0].apply(batch)

        try:
            with damaged_metadata(self.path):
                meta.write(
                    body, before_commit=sync_data, unlocked=self._unlocked if unlock else None
                )
        except WriteFailed as failed:
            if isinstance(failed.error, SyncFailed):
                self._broken = failed.error
            raise
        except SyncFailed as exc:
            self._broken = exc
            raise
        finally:
            self._applying = None
        return applied[0]

    def _committed(self, done: Batch) -> None:
        """After a commit: take its counts, release what may be released, cache slot data."""
        self._state = done.state
        self._unsynced = True
        counts = self._counts
        for chunk, taken in done.allocated_by_chunk.items():
            counts.free_in_chunk[chunk] -= taken
            counts.total -= taken
        counts.rover = done.rover
        counts.unreleased.update(done.dead)
        if counts.unpunched:
            counts.unpunched.difference_update(done.new_data)
        if self.volatile is not None:
            self._release(done.dead)  # the commit is as durable as it will ever be
        else:
            self._release(self._cooling)  # durable now that this commit synced its data pages
            self._cooling = done.dead
        self._remember_slots(done)

    def _release(self, slots: list[int]) -> None:
        """Make freed slots allocatable; give their space back at once in a volatile store (zram
        frees its memory), at the next flush in a durable one (see `UNPUNCHED_LIMIT`)."""
        if not slots:
            return
        counts = self._counts
        counts.release(slots)
        if self.volatile is not None or not self._backend.punches:
            self._discard(slots)
            return
        counts.unpunched.update(slots)
        if len(counts.unpunched) > UNPUNCHED_LIMIT:
            self._punch_released()

    def _punch_released(self) -> None:
        """Punch the released slots that were not written again, except those the batch being
        committed (its syncs run without the lock) has taken."""
        counts = self._counts
        if not counts.unpunched:
            return
        taken = self._applying.new_data if self._applying is not None else {}
        slots = sorted(slot for slot in counts.unpunched if slot not in taken)
        counts.unpunched.intersection_update(taken)
        self._discard(slots)

    def _discard(self, slots: list[int]) -> None:
        try:
            self._backend.discard(slots)
        except BackendError as exc:
            self._log.error("giving back the space of freed slots failed: %s", exc)

    def _remember_slots(self, done: Batch) -> None:
        """Forget the slots a commit freed, remember the ones it wrote or read, and keep the
        cache within its bound (oldest first out)."""
        cache = self._slot_cache
        cache.update(done.stored)
        cache.update(done.new_data)
        for slot in done.dead:
            cache.pop(slot, None)
        excess = len(cache) - self._slot_cache_pages
        if excess > 0:
            for slot in list(itertools.islice(cache, excess)):
                del cache[slot]

    def _flush_locked(self) -> None:
        """Commit, make the commit durable, release the slots it freed; raise the error of a
        commit that failed since the last flush."""
        if self.readonly or self._closed:
            return
        if self._observer is None:
            self._flush_untimed()
            return
        start = time.perf_counter()
        try:
            self._flush_untimed()
        finally:
            self._observer.flushed(time.perf_counter() - start)

    def _flush_untimed(self) -> None:
        self._commit_locked()
        if self.volatile is None and self._unsynced:
            try:
                self._meta.sync()
            except SyncFailed as exc:
                self._broken = exc
                raise
            self._unsynced = False
            self._release(self._cooling)
            self._cooling = []
        self._punch_released()
        error, self._write_error = self._write_error, None
        if error is not None:
            raise type(error)(f"an earlier write failed and was not kept: {error}") from error

    def statistics(self) -> Statistics:
        """Usage as of the last commit (pending pages are not counted)."""
        with self._lock:
            return statistics_of(self._meta, self.config, self._state)

    def check(
        self,
        *,
        repair: bool = False,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> CheckResult:
        """Commit, then run every named check of `dedupblk.store.check` on this open store; with
        ``repair`` (a store open for writing), rebuild what is derived and reload it."""
        with self._lock:
            if repair:
                self._check_writable()
            self._commit_locked()
            self._wait_for_no_batch()
            meta = self._meta
            meta.drop_reader()
            result = run_checks(
                meta, self._backend, repair=repair, progress=progress, on_total=on_total
            )
            if result.repaired:
                self.config, self._state = meta.read_header()
                self._slot_cache.clear()
                self._cooling = []
                self._count_slots(give_back=True)
            return result

    def lost_pages(self) -> list[int]:
        """Pages that read as EIO (see "Repair" in the format), in order."""
        with self._lock:
            meta = self._meta
            lost: list[int] = []
            with damaged_metadata(self.path), meta.env.begin(buffers=True) as txn:
                for key, chunk in txn.cursor(db=meta.map):
                    first = int.from_bytes(key[4:12], "big") * MAP_CHUNK_PAGES
                    lost.extend(
                        first + i
                        for i in range(MAP_CHUNK_PAGES)
                        if _U32_AT(chunk, i * 4)[0] == LOST_ENTRY
                    )
            return lost


class _Unrepairable(Exception):
    """A store not opened for repair: its metadata file's structure is damaged."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__("the metadata file itself is damaged")
        self.result = result


def check_store(
    path: str | os.PathLike[str],
    *,
    repair: bool = False,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CheckResult:
    """Open the store (shared; exclusive to repair), run every named check, close it. With
    ``repair``, fix what was found from the map and return the problems that the repair fixed
    (a second check should then be clean)."""
    try:
        # A repair first checks the file's structure: writing into B-trees LMDB cannot walk
        # could spread the damage, and opening a store for writing commits its state.
        opened = Store(os.fspath(path), readonly=not repair, fingerprint=xxh3_128,
                       verify_structure=repair)  # fmt: skip
    except _Unrepairable as damaged:
        return damaged.result
    with opened as store:
        return store.check(repair=repair, progress=progress, on_total=on_total)
