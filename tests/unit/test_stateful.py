"""Hypothesis drives random writes, trims, zeroes, flushes and reopens against the store and a
`bytearray` model, and checks every invariant after every step."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dedupblk.store import Store, StoreFull, create_store, open_store
from dedupblk.store.format import FILL_ENTRY, LOST_ENTRY, REF_CHUNK_SLOTS, U64BE

P = 4096
PAGES = 24
SIZE = PAGES * P
HOT = [bytes([n]) * 7 + b"\x01" + bytes(range(256)) * 15 + bytes(P - 8 - 3840) for n in range(3)]

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 3 * P)


@st.composite
def contents(draw: st.DrawFn, length: int) -> bytes:
    kind = draw(st.sampled_from(["hot", "fill", "zero", "random", "mixed"]))
    if kind == "hot":
        return (draw(st.sampled_from(HOT)) * 4)[:length]
    if kind == "fill":
        return bytes([draw(st.integers(1, 255))]) * length
    if kind == "zero":
        return bytes(length)
    if kind == "random":
        return draw(st.binary(min_size=length, max_size=length))
    half = length // 2
    return bytes(half) + draw(st.binary(min_size=length - half, max_size=length - half))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="dedupblk-stateful-")
        self.path = f"{self.dir}/store"
        # A small backend: overwrites between flushes reach the full-backend paths too.
        create_store(self.path, SIZE, backend_size=(PAGES // 2 + 1) * P, max_share=4)
        self.store: Store = open_store(self.path)
        self.model = bytearray(SIZE)

    def _clip(self, offset: int, length: int) -> int:
        return min(length, SIZE - offset)

    @rule(offset=offsets, length=lengths, data=st.data())
    def write(self, offset: int, length: int, data: st.DataObject) -> None:
        length = self._clip(offset, length)
        payload = data.draw(contents(length))
        try:
            self.store.write(offset, payload)
        except StoreFull:
            # Pages accepted before the full one are written; re-read them into the model.
            self.model[:] = self.store.read(0, SIZE)
            return
        self.model[offset : offset + length] = payload

    @rule(page=st.integers(0, PAGES - 1), count=st.integers(1, 4), hot=st.sampled_from(HOT))
    def write_duplicates(self, page: int, count: int, hot: bytes) -> None:
        count = min(count, PAGES - page)
        try:
            self.store.write(page * P, hot * count)
        except StoreFull:
            self.model[:] = self.store.read(0, SIZE)
            return
        self.model[page * P : (page + count) * P] = hot * count

    @rule(offset=offsets, length=lengths, zero=st.booleans())
    def discard(self, offset: int, length: int, zero: bool) -> None:
        length = self._clip(offset, length)
        end = offset + length
        if zero:
            try:
                self.store.write_zeroes(offset, length)
            except StoreFull:
                self.model[:] = self.store.read(0, SIZE)
                return
            self.model[offset:end] = bytes(length)
            return
        self.store.trim(offset, length)  # never fails for space
        whole_start, whole_end = -(-offset // P) * P, end // P * P
        self.model[whole_start:whole_end] = bytes(max(0, whole_end - whole_start))
        # A partial page reads back zeroed, or unchanged when the backend had no slot for it.
        for lo, hi in ((offset, min(end, whole_start)), (max(offset, whole_end), end)):
            if lo < hi:
                got = self.store.read(lo, hi - lo)
                assert got in (bytes(hi - lo), bytes(self.model[lo:hi]))
                self.model[lo:hi] = got

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @rule()
    def commit(self) -> None:
        self.store.commit()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = open_store(self.path)

    @precondition(lambda self: True)
    @invariant()
    def reads_match_model(self) -> None:
        assert self.store.read(0, SIZE) == bytes(self.model)

    @invariant()
    def invariants_hold(self) -> None:
        assert self.store.check().problems == []
        # A second count, independent of `check`: map entries naming each slot, and refcounts.
        meta = self.store._meta
        with meta.env.begin() as txn:
            mapped = Counter(
                entry
                for chunk in txn.cursor(db=meta.map).iternext(keys=False)
                for entry in memoryview(chunk).cast("I")
                if entry not in (0, FILL_ENTRY, LOST_ENTRY)
            )
            refs = {
                U64BE.unpack(key)[0] * REF_CHUNK_SLOTS + i: n
                for key, chunk in txn.cursor(db=meta.refs).iternext()
                for i, n in enumerate(chunk)
                if n
            }
        assert refs == dict(mapped)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=60,
    derandomize=bool(os.environ.get("CI")),  # CI replays the same examples; local runs explore
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStore = StoreMachine.TestCase
