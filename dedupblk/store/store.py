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

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..errors import (
    BackendMismatch,
    InvalidRequest,
    NotAStore,
    ReadOnlyStore,
    StoreError,
    StoreFull,
)
from .backend import Backend
from .batch import ZERO_PENDING, Batch, Pending
from .check import CheckResult, Progress, run_checks
from .fingerprint import DATA, FILL, ZERO, ZERO_PAGE, FingerprintFn, classify, fill_page, xxh3_128
from .format import (
    DATA_FILE,
    KEY_STATE,
    KIND_SLOT,
    MAP_ENTRY,
    META_DIR,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64BE,
    State,
    key_int,
)
from .lock import StoreLock
from .meta import Meta
from .stats import Statistics, statistics_of

log = logging.getLogger(__name__)

GROUP_PAGES = 1024  # pages buffered before a commit (4 MiB)
GROUP_SECONDS = 0.05  # longest a buffered page waits for its commit
DEFERRED_LIMIT = 1 << 16  # freed-but-not-durable slots before a commit forces a flush
SLOT_CACHE_PAGES = 1024  # slot contents kept for verifying duplicates (4 MiB)

_pack_u64 = U64BE.pack
_unpack_map = MAP_ENTRY.unpack


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
            self._meta = Meta(store_dir, readonly=readonly)
            try:
                self.config, self._state = self._meta.read_header()
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
            entry = ZERO_PENDING
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
        applied: list[Batch] = []

        def body(txn: Any) -> State:
            # The last try is the one that committed.
            applied[:] = [
                Batch(
                    txn,
                    meta=self._meta,
                    backend=self._backend,
                    config=self.config,
                    state=self._state,
                    fingerprint=self._fingerprint,
                    slot_cache=self._slot_cache,
                    free_count=self._free_count,
                )
            ]
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

    def _remember_slots(self, done: Batch) -> None:
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
            result = run_checks(
                self._meta, self._backend, repair=repair, progress=progress, on_total=on_total
            )
            if result.repaired:
                self.config, self._state = self._meta.read_header()
                self._slot_cache.clear()
                self._refresh_available()
            return result


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
    with open_store(path, readonly=not repair) as store:
        return store.check(repair=repair, progress=progress, on_total=on_total)
