"""One commit: the pending pages of a batch applied to the map, refcounts, index and free slots
inside one LMDB write transaction (see "Write order and durability" in `dedupblk.store.format`)."""

from __future__ import annotations

from typing import Any

from ..errors import StoreFull
from .backend import Backend
from .fingerprint import FILL, ZERO, FingerprintFn
from .format import (
    INDEX_ENTRY,
    KEY_STATE,
    KIND_FILL,
    KIND_SLOT,
    MAP_ENTRY,
    REF,
    U64BE,
    Config,
    State,
)
from .meta import Meta

# A pending page: (kind, fill word, page bytes for DATA).
Pending = tuple[int, int, bytes | None]
ZERO_PENDING: Pending = (ZERO, 0, None)
_pack_u64 = U64BE.pack
_unpack_map = MAP_ENTRY.unpack
_pack_map = MAP_ENTRY.pack
_unpack_ref = REF.unpack
_pack_ref = REF.pack
_unpack_index = INDEX_ENTRY.unpack
_pack_index = INDEX_ENTRY.pack

# Outcomes of looking a page's fingerprint up (in `Batch.apply`).
_HIT, _NEW, _FULL, _COLLISION = range(4)


class Batch:
    """One commit: applies pending pages to the map, refcounts, index and free slots inside one
    write transaction. Page data for new slots is written to the backend before `apply` returns,
    that is before the transaction commits (write order steps 1-2 of the format spec).

    Refcount changes are summed per slot and written once at the end, so a page's new reference
    is always counted before its old one is dropped, and a batch full of duplicates reads and
    writes each shared slot's refcount once."""

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
        free_count: int,
    ) -> None:
        self.txn = txn
        self.meta = meta
        self.backend = backend
        self.config = config
        self.fingerprint = fingerprint
        self.bounded = config.max_index_entries > 0
        self.state = State(
            state.slot_high, state.mapped_pages, state.same_filled_pages, state.next_seq, 0
        )
        self.new_data: dict[int, bytes] = {}  # slot -> page, for slots allocated in this batch
        self.new_refs: dict[int, bytes] = {}  # slot -> fingerprint, likewise
        self.deltas: dict[int, int] = {}  # slot -> refcount change in this batch
        # slot -> (refcount, fingerprint) before this batch, read lazily
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.targets: dict[bytes, tuple[int, bytes | None]] = {}  # fp -> (slot, index record)
        self.stored: dict[int, bytes] = {}  # slot -> bytes read for verification
        self.cache = slot_cache  # committed slots' contents (read-only here)
        self.allocated = 0  # slots taken from the free ones or the never-used ones
        self.dead: list[int] = []  # slots whose last reference this batch dropped
        self.free_cursor: Any = None
        self.free_left = free_count
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
