"""One commit: the pending pages of a batch applied to the map, the refcounts, the fingerprint
words and the index inside one LMDB write transaction (see "Write order and durability" in
`dedupblk.store.format`).

Every record a batch changes is read once into a private copy, changed there, and written back
once at the end, so a batch of many pages costs one put per chunk, bucket and fill record it
touches. Refcount increments are made at once; decrements wait for the end of the batch, so a
slot a page stops naming is never taken for new data within the same batch, and a page's new
reference is counted before its old one is dropped.

A batch only reads the store's free-slot counts (`SlotCounts`); the changes it would make are
kept here and applied by the store after the commit succeeded, so a transaction that is retried
(a grown map) or fails changes nothing in memory.
"""

from __future__ import annotations

import re
import struct
from array import array
from typing import Any

from ..errors import BackendError, DedupblkError, FormatError, StoreFull
from .backend import Backend
from .fingerprint import DATA, ZERO, Classified, FingerprintFn
from .format import (
    FILL_ENTRY,
    FIRST_DATA_SLOT,
    FP_CHUNK_SLOTS,
    KEY_STATE,
    LOST_ENTRY,
    MAP_CHUNK_PAGES,
    REF_CHUNK_SLOTS,
    U32BE,
    U64BE,
    U64LE,
    Config,
    State,
    fill_key,
    map_key,
)
from .meta import Meta

# A pending page: what `classify` made of it.
Pending = Classified

_U32 = struct.Struct("<I")
_unpack_u32 = _U32.unpack_from
_unpack_u32be = struct.Struct(">I").unpack_from
_pack_u32 = _U32.pack_into
_pack_u64be = U64BE.pack
_pack_u32be = U32BE.pack
_EMPTY_MAP_CHUNK = bytes(MAP_CHUNK_PAGES * 4)
_EMPTY_REF_CHUNK = bytes(REF_CHUNK_SLOTS)
_EMPTY_FP_CHUNK = bytes(FP_CHUNK_SLOTS * 4)
_NONZERO = re.compile(b"[^\x00]")


class WriteFailed(Exception):
    """The batch's new slot data could not be written (or synced); ``error`` says why. Nothing
    of the transaction is committed."""

    def __init__(self, error: DedupblkError) -> None:
        super().__init__(str(error))
        self.error = error


class _NeedsSlot(Exception):
    """A page that needs a new slot, in a batch that may not write any (``new_data=False``)."""


class SlotCounts:
    """The store's view of its free slots, in memory: how many allocatable slots each refs chunk
    holds (refcount 0, not slot 0, below the capacity, and released), where the next search
    starts, the slots freed by recent commits that are not released yet, and the released ones
    whose old data still takes space in the backend (a durable store punches them at a flush,
    and allocation takes them first: a slot that is written again needs no punch)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        chunks = -(-capacity // REF_CHUNK_SLOTS)
        self.free_in_chunk = array("I", bytes(4 * chunks))
        self.total = 0
        self.rover = FIRST_DATA_SLOT
        self.unreleased: set[int] = set()
        self.unpunched: set[int] = set()

    def count_chunk(self, chunk: int, refs: bytes | memoryview | None) -> None:
        """Set a chunk's count from its refcounts (None: the chunk has no record, all free)."""
        first = chunk * REF_CHUNK_SLOTS
        end = min(self.capacity, first + REF_CHUNK_SLOTS)
        free = end - first if refs is None else bytes(refs[: end - first]).count(0)
        if first == 0:
            free -= 1  # the header slot
        free -= sum(1 for slot in self.unreleased if first <= slot < end)
        self.total += free - self.free_in_chunk[chunk]
        self.free_in_chunk[chunk] = free

    def release(self, slots: list[int]) -> None:
        """Make slots freed by a commit that is now safe to reuse allocatable."""
        for slot in slots:
            self.unreleased.discard(slot)
            self.free_in_chunk[slot // REF_CHUNK_SLOTS] += 1
        self.total += len(slots)


class Batch:
    """The changes of one commit, made inside ``txn``; see the module docstring."""

    def __init__(
        self,
        txn: Any,
        *,
        meta: Meta,
        backend: Backend,
        config: Config,
        state: State,
        fingerprint: FingerprintFn,
        slot_cache: dict[int, bytes],
        counts: SlotCounts,
        start_writeback: bool,
        new_data: bool = True,
    ) -> None:
        self.txn = txn
        self.meta = meta
        self.backend = backend
        self.config = config
        self.fingerprint = fingerprint
        self.cache = slot_cache  # committed slots' contents (read-only here)
        self.counts = counts  # read-only here; see `allocated_by_chunk`
        self.start_writeback = start_writeback
        self.may_allocate = new_data
        self.state = state.copy()
        self.state.clean = 0
        self.shift = 32 - config.bucket_bits
        self.cap = config.bucket_cap
        self.map_chunks: dict[int, bytearray] = {}
        self.ref_chunks: dict[int, bytearray] = {}
        self.fp_chunks: dict[int, bytearray] = {}
        self.buckets: dict[int, bytearray] = {}
        # What was changed, so that what was only looked at is not written back.
        self.dirty_map: set[int] = set()
        self.dirty_refs: set[int] = set()
        self.dirty_fps: set[int] = set()
        self.dirty_buckets: set[int] = set()
        self.fill_words: dict[int, int] = {}  # page -> word to put
        self.fill_deletes: set[int] = set()
        self.decrements: dict[int, int] = {}  # slot -> references to drop at the end
        self.new_data: dict[int, bytes] = {}  # slot -> page, for slots allocated here
        self.stored: dict[int, bytes] = {}  # slot -> bytes read for verification
        self.dead: list[int] = []  # slots whose last reference this batch dropped
        self.allocated_by_chunk: dict[int, int] = {}  # refs chunk -> slots taken from it
        self.rover = counts.rover
        self.get = txn.get
        self.max_share = config.max_share
        self.targets: dict[bytes, int] = {}  # fingerprint -> the slot this batch gave it
        self.applied = 0  # pages applied (a batch without new data leaves some out)
        self.new_slots = 0  # slots allocated; in `state` at the end of `apply`
        self.new_entries = 0  # index entries added by `_place` itself, likewise
        # The run `_allocate` takes slots from: ``[_run_next, _run_end)`` of refs chunk
        # ``_run_chunk`` (-1: none), opened at ``_run_start``.
        self._run_chunk = -1
        self._run_start = self._run_next = self._run_end = 0
        self._unreleased = counts.unreleased
        self._unpunched: list[int] | None = None  # `counts.unpunched`, descending, when needed

    # -- records, read once into private copies ------------------------------------------------

    def _map_chunk(self, chunk: int) -> bytearray:
        found = self.map_chunks.get(chunk)
        if found is None:
            raw = self.get(map_key(chunk), db=self.meta.map)
            found = self.map_chunks[chunk] = bytearray(raw if raw is not None else _EMPTY_MAP_CHUNK)
        return found

    def _ref_chunk(self, chunk: int) -> bytearray:
        found = self.ref_chunks.get(chunk)
        if found is None:
            raw = self.get(_pack_u64be(chunk), db=self.meta.refs)
            found = self.ref_chunks[chunk] = bytearray(raw if raw is not None else _EMPTY_REF_CHUNK)
        return found

    def _fp_chunk(self, chunk: int) -> bytearray:
        found = self.fp_chunks.get(chunk)
        if found is None:
            raw = self.get(_pack_u64be(chunk), db=self.meta.fps)
            found = self.fp_chunks[chunk] = bytearray(raw if raw is not None else _EMPTY_FP_CHUNK)
        return found

    def _bucket(self, bucket: int) -> bytearray:
        found = self.buckets.get(bucket)
        if found is None:
            raw = self.get(_pack_u32be(bucket), db=self.meta.index)
            found = self.buckets[bucket] = bytearray(raw if raw is not None else b"")
        return found

    # -- applying pages ------------------------------------------------------------------------

    def apply(self, batch: dict[int, Pending]) -> State:
        """Apply every pending page, write new slot data and put every changed record; the
        caller syncs the data (a durable store) and then commits.

        This loop runs for every page written, so the common cases of `_place` are inline: a
        duplicate of bytes this batch placed already, and a page whose bytes the index has no
        entry for (no tag of its bucket matches), which gets a new slot here. Everything else
        goes through `_place`.
        """
        state = self.state
        map_chunks, dirty_map = self.map_chunks, self.dirty_map
        fill_words, fill_deletes, decrements = self.fill_words, self.fill_deletes, self.decrements
        place, allocate, fingerprint = self._place, self._allocate, self.fingerprint
        buckets, targets, new_data = self.buckets, self.targets, self.new_data
        cache, max_share = self.cache, self.max_share
        ref_chunks, fp_chunks = self.ref_chunks, self.fp_chunks
        dirty_refs, dirty_fps, dirty_buckets = self.dirty_refs, self.dirty_fps, self.dirty_buckets
        get, index_db, shift = self.get, self.meta.index, self.shift
        inline = self.may_allocate and not self.cap  # else every new page needs `_place`
        chunk_no, chunk, first, end = -1, bytearray(), 0, 0
        mapped = fills = lost = 0  # changes to the state's counters
        applied = placed = 0  # pages applied; new slots (and index entries) made inline
        for page, (kind, word, content) in sorted(batch.items()):  # consecutive pages share a
            if page >= end:  # map chunk (and the pages are unique: no entries are compared)
                chunk_no = page // MAP_CHUNK_PAGES
                first = chunk_no * MAP_CHUNK_PAGES
                end = first + MAP_CHUNK_PAGES
                chunk = map_chunks.get(chunk_no) or self._map_chunk(chunk_no)
            at = (page - first) * 4
            old: int = _unpack_u32(chunk, at)[0]
            if kind == DATA:
                assert content is not None
                fp = fingerprint(content)
                head: int = _unpack_u32be(fp)[0]
                bucket_no = head >> shift
                bucket = buckets.get(bucket_no)
                if bucket is None:
                    raw = get(_pack_u32be(bucket_no), db=index_db)
                    bucket = buckets[bucket_no] = bytearray(raw) if raw is not None else bytearray()
                tag = fp[4:6]
                known = targets.get(fp)
                n2 = len(bucket) // 3  # bytes of the tag region: 2 of every 6
                new = -1  # not placed here: `_place` places it
                if known is not None:  # `_place`'s first test
                    if (new_data.get(known) or cache.get(known)) == content:
                        if known == old:
                            new = old
                        else:
                            refs = ref_chunks[known // REF_CHUNK_SLOTS]
                            i = known % REF_CHUNK_SLOTS
                            if refs[i] < max_share:
                                refs[i] += 1  # its chunk is dirty since it was placed
                                new = known
                elif inline and (not n2 or bucket.find(tag, 0, n2) == -1):
                    new = allocate()  # `_place`'s last case
                    new_data[new] = content
                    cno = new // REF_CHUNK_SLOTS
                    (ref_chunks.get(cno) or self._ref_chunk(cno))[new - cno * REF_CHUNK_SLOTS] = 1
                    dirty_refs.add(cno)
                    fno = new // FP_CHUNK_SLOTS
                    fps = fp_chunks.get(fno) or self._fp_chunk(fno)
                    _pack_u32(fps, (new - fno * FP_CHUNK_SLOTS) * 4, head)
                    dirty_fps.add(fno)
                    bucket[n2:n2] = tag
                    bucket += _U32.pack(new)
                    dirty_buckets.add(bucket_no)
                    targets[fp] = new
                    placed += 1
                if new < 0:
                    try:
                        new = place(content, old, fp, head, bucket_no, bucket, tag)
                    except _NeedsSlot:
                        continue  # dropped: the page keeps its committed content
            elif kind == ZERO:
                new = 0
            else:
                new = FILL_ENTRY
                fill_words[page] = word
                fill_deletes.discard(page)
            applied += 1
            if new == old:
                continue  # the same slot again, or a fill whose word was just replaced
            _pack_u32(chunk, at, new)
            dirty_map.add(chunk_no)
            if old:
                if old < LOST_ENTRY:
                    mapped -= 1
                    decrements[old] = decrements.get(old, 0) + 1
                elif old == FILL_ENTRY:
                    fills -= 1
                    fill_words.pop(page, None)
                    fill_deletes.add(page)
                else:
                    lost -= 1
            if new:
                if new < LOST_ENTRY:
                    mapped += 1
                else:
                    fills += 1
        self.applied += applied
        self.new_slots += placed
        self.new_entries += placed
        state.mapped_pages += mapped
        state.same_filled_pages += fills
        state.lost_pages += lost
        state.stored_slots += self.new_slots
        state.index_entries += self.new_entries
        self._end_run()
        self._drop_references()
        if self.new_data:
            try:
                self.backend.write_slots(
                    list(self.new_data.items()), start_writeback=self.start_writeback
                )
            except DedupblkError as exc:
                raise WriteFailed(exc) from exc
        self._put_records()
        return state

    def _place(
        self, content: bytes, old: int, fp: bytes, head: int, bucket_no: int, bucket: bytearray,
        tag: bytes,
    ) -> int:  # fmt: skip
        """The slot for a DATA page (fingerprint ``fp``, whose first word ``head`` names bucket
        ``bucket_no``, read into ``bucket``; ``tag`` its tag): a verified duplicate with room for
        one more reference, or a newly allocated slot that becomes the dedup target for these
        bytes."""
        known = self.targets.get(fp)  # this batch placed these bytes already
        if known is not None and self._verified(known, content):
            if known == old:
                return old
            refs = self.ref_chunks[known // REF_CHUNK_SLOTS]
            if refs[known % REF_CHUNK_SLOTS] < self.max_share:
                refs[known % REF_CHUNK_SLOTS] += 1  # its chunk is dirty since it was placed
                return known
        full_slot = 0
        if bucket:
            tags = len(bucket) // 3  # bytes of the tag region: 2 of every 6
            at = bucket.find(tag, 0, tags)
            while at != -1:
                if not at & 1:
                    slot: int = _unpack_u32(bucket, tags + at * 2)[0]
                    if self._verified(slot, content):
                        if slot == old:
                            return old  # rewrote the bytes the page already had
                        cno = slot // REF_CHUNK_SLOTS
                        refs = self.ref_chunks.get(cno) or self._ref_chunk(cno)
                        i = slot % REF_CHUNK_SLOTS
                        if refs[i] < self.max_share:
                            refs[i] += 1
                            self.dirty_refs.add(cno)
                            self.targets[fp] = slot
                            return slot
                        full_slot = slot
                at = bucket.find(tag, at + 1, tags)
        if not self.may_allocate:
            raise _NeedsSlot
        slot = self._allocate()
        self.new_data[slot] = content
        cno = slot // REF_CHUNK_SLOTS
        (self.ref_chunks.get(cno) or self._ref_chunk(cno))[slot - cno * REF_CHUNK_SLOTS] = 1
        self.dirty_refs.add(cno)
        fno = slot // FP_CHUNK_SLOTS
        _pack_u32(
            self.fp_chunks.get(fno) or self._fp_chunk(fno), (slot - fno * FP_CHUNK_SLOTS) * 4, head
        )
        self.dirty_fps.add(fno)
        self.new_slots += 1
        if full_slot:
            self._unindex(bucket_no, full_slot)  # the new slot takes its place as the target
        if self.cap:
            self._index(bucket_no, bucket, tag, slot)
        else:  # the common case of `_index`, inline
            n = len(bucket) // 6
            bucket[n * 2 : n * 2] = tag
            bucket += _U32.pack(slot)
            self.dirty_buckets.add(bucket_no)
            self.new_entries += 1
        self.targets[fp] = slot
        return slot

    def _verified(self, slot: int, content: bytes) -> bool:
        """Whether ``slot`` holds ``content``; a slot that cannot be read holds no match (the
        page gets a slot of its own; `check` finds what is wrong with the other)."""
        try:
            return self._contents(slot) == content
        except BackendError:
            return False

    def _contents(self, slot: int) -> bytes:
        held = self.new_data.get(slot) or self.cache.get(slot) or self.stored.get(slot)
        if held is None:
            held = self.stored[slot] = self.backend.read_slot(slot)
        return held

    def _index(self, bucket_no: int, bucket: bytearray, tag: bytes, slot: int) -> None:
        """Add (tag, slot) as the newest entry of bucket ``bucket_no`` (``bucket``, its value);
        with a bound, then drop the oldest entries of singly-referenced slots (the new one too,
        if it is the only one) until the bucket is within its share: shared slots keep theirs,
        so it may stay above."""
        n = len(bucket) // 6
        bucket[n * 2 : n * 2] = tag
        bucket += _U32.pack(slot)
        self.dirty_buckets.add(bucket_no)
        self.state.index_entries += 1
        if self.cap and n + 1 > self.cap:
            self._prune(bucket_no, n + 1)

    def _prune(self, bucket_no: int, n: int) -> None:
        bucket = self._bucket(bucket_no)
        i = 0
        while n > self.cap and i < n:
            slot: int = _unpack_u32(bucket, n * 2 + i * 4)[0]
            if self._ref_chunk(slot // REF_CHUNK_SLOTS)[slot % REF_CHUNK_SLOTS] == 1:
                self._remove_entry(bucket_no, n, i)
                n -= 1
            else:
                i += 1

    def _unindex(self, bucket_no: int, slot: int) -> None:
        """Remove ``slot``'s entry from its bucket, if it has one."""
        bucket = self._bucket(bucket_no)
        n = len(bucket) // 6
        key = _U32.pack(slot)
        at = bucket.find(key, n * 2)
        while at != -1 and (at - n * 2) % 4:
            at = bucket.find(key, at + 1)
        if at != -1:
            self._remove_entry(bucket_no, n, (at - n * 2) // 4)

    def _remove_entry(self, bucket_no: int, n: int, i: int) -> None:
        bucket = self._bucket(bucket_no)
        del bucket[n * 2 + i * 4 : n * 2 + i * 4 + 4]
        del bucket[i * 2 : i * 2 + 2]
        self.dirty_buckets.add(bucket_no)
        self.state.index_entries -= 1

    def _allocate(self) -> int:
        """A free, released slot (see the format's write order): the next one after the last
        taken (wrapping around), so that a batch's new slots lie together and its fingerprint
        words and refcounts are few records to rewrite; but first a released slot that was not
        punched yet, lowest first. `StoreFull` when there is none.

        Slots are taken from a *run*, slots of one refs chunk that `_search` found with
        refcount 0 (within the capacity): taking the next is a comparison, and what a run took
        is counted when it ends (`_end_run`)."""
        slot = self._run_next
        if slot < self._run_end and slot not in self._unreleased:
            self._run_next = slot + 1
            return slot
        self._end_run()
        if self.counts.unpunched:
            slot = self._take_unpunched()
            if slot:
                return slot
        return self._search()

    def _end_run(self) -> None:
        """Count what the run took (in `allocated_by_chunk`, and the rover after it); no run is
        open afterwards."""
        if self._run_chunk >= 0:
            taken = self._run_next - self._run_start
            chunk_no = self._run_chunk
            self.allocated_by_chunk[chunk_no] = self.allocated_by_chunk.get(chunk_no, 0) + taken
            slot = self._run_next
            self.rover = slot if slot < self.counts.capacity else FIRST_DATA_SLOT
            self._run_chunk = -1
        self._run_next = self._run_end = 0

    def _take_unpunched(self) -> int:
        """A slot of `SlotCounts.unpunched` that this batch has not taken; 0 when none is left."""
        pool = self._unpunched
        if pool is None:
            pool = self._unpunched = sorted(self.counts.unpunched, reverse=True)
        while pool:
            slot = pool.pop()
            chunk_no = slot // REF_CHUNK_SLOTS
            if not self._ref_chunk(chunk_no)[slot - chunk_no * REF_CHUNK_SLOTS]:
                self.allocated_by_chunk[chunk_no] = self.allocated_by_chunk.get(chunk_no, 0) + 1
                return slot
        return 0

    def _search(self) -> int:
        """`_allocate` from the rover on, skipping chunks the counts say are full."""
        counts = self.counts
        chunks = len(counts.free_in_chunk)
        taken = self.allocated_by_chunk
        first = self.rover // REF_CHUNK_SLOTS
        for step in range(chunks + 1):
            chunk_no = (first + step) % chunks
            if counts.free_in_chunk[chunk_no] - taken.get(chunk_no, 0) <= 0:
                continue
            refs = self.ref_chunks.get(chunk_no) or self._ref_chunk(chunk_no)
            base = chunk_no * REF_CHUNK_SLOTS
            at = refs.find(0, self.rover - base if step == 0 and self.rover > base else 0)
            while at != -1:
                slot = base + at
                if slot >= counts.capacity:
                    break
                if slot >= FIRST_DATA_SLOT and slot not in counts.unreleased:
                    zeros = _NONZERO.search(refs, at + 1)  # the run: the zeros from ``at`` on
                    end = base + (zeros.start() if zeros is not None else REF_CHUNK_SLOTS)
                    self._run_chunk, self._run_start, self._run_next = chunk_no, slot, slot + 1
                    self._run_end = min(end, counts.capacity)
                    return slot
                at = refs.find(0, at + 1)
        raise StoreFull(f"no free slot in backend {self.backend.path}")

    def _drop_references(self) -> None:
        """Apply the decrements; a slot whose last reference went dies here: its index entry
        goes with it, in the same transaction."""
        ref_chunks, fp_chunks, dirty_refs = self.ref_chunks, self.fp_chunks, self.dirty_refs
        dead: list[int] = []
        for slot, drop in self.decrements.items():
            cno = slot // REF_CHUNK_SLOTS
            refs = ref_chunks.get(cno) or self._ref_chunk(cno)
            i = slot - cno * REF_CHUNK_SLOTS
            left = refs[i] - drop
            if left < 0:
                raise FormatError(
                    f"slot {slot} has refcount {refs[i]} but {drop} more mappings leave it: the "
                    "metadata is damaged; see `dedupblk check`"
                )
            refs[i] = left
            dirty_refs.add(cno)
            if not left:
                dead.append(slot)
        if not dead:
            return
        self.dead.extend(dead)
        self.state.stored_slots -= len(dead)
        shift, unindex = self.shift, self._unindex
        for slot in dead:
            fno = slot // FP_CHUNK_SLOTS
            fps = fp_chunks.get(fno) or self._fp_chunk(fno)
            unindex(_unpack_u32(fps, (slot - fno * FP_CHUNK_SLOTS) * 4)[0] >> shift, slot)

    def _put_records(self) -> None:
        txn, meta = self.txn, self.meta
        for chunk_no in self.dirty_map:
            chunk = self.map_chunks[chunk_no]
            key = map_key(chunk_no)
            if chunk == _EMPTY_MAP_CHUNK:
                txn.delete(key, db=meta.map)
            else:
                txn.put(key, chunk, db=meta.map)
        for chunk_no in self.dirty_refs:
            refs = self.ref_chunks[chunk_no]
            key = _pack_u64be(chunk_no)
            if refs == _EMPTY_REF_CHUNK:
                txn.delete(key, db=meta.refs)
            else:
                txn.put(key, refs, db=meta.refs)
        for chunk_no in self.dirty_fps:
            txn.put(_pack_u64be(chunk_no), self.fp_chunks[chunk_no], db=meta.fps)
        for bucket_no in self.dirty_buckets:
            bucket = self.buckets[bucket_no]
            key = _pack_u32be(bucket_no)
            if bucket:
                txn.put(key, bucket, db=meta.index)
            else:
                txn.delete(key, db=meta.index)
        for page in self.fill_deletes:
            txn.delete(fill_key(page), db=meta.fills)
        for page, word in self.fill_words.items():
            txn.put(fill_key(page), U64LE.pack(word), db=meta.fills)
        txn.put(KEY_STATE, self.state.pack(), db=meta.info)
