"""``dedupblk check``: the invariants of `dedupblk.store.format`, one named check each.

Each check reads one snapshot of the metadata (and the slots it must hash) and returns `Problem`s.
`repair` rebuilds everything derived from the map, the one source of truth: refcounts (recounted),
fingerprints (rehashed), the free list (every unreferenced slot), the index and age records (entries
that do not name a live slot holding their content are dropped) and the counters. Mappings that lie
outside the device or the backend are dropped (those pages then read as zeros) and reported.
The checks run on an open store (`Store.check`), under its lock: shared for a check, exclusive
for a repair, so they never race a writer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .fingerprint import xxh3_128
from .format import (
    FIRST_DATA_SLOT,
    INDEX_ENTRY,
    KEY_STATE,
    KIND_FILL,
    KIND_SLOT,
    MAP_ENTRY,
    REF,
    U64BE,
    Config,
    State,
    key_int,
    slot_key,
)
from .meta import Meta

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Problem:
    check: str
    message: str


@dataclass
class Snapshot:
    """Everything the checks need, read in one read transaction."""

    config: Config
    state: State
    map: dict[int, tuple[int, int]]
    refs: dict[int, tuple[int, bytes]]
    index: dict[bytes, tuple[int, int]]
    age: dict[int, bytes]
    free: set[int]
    deferred: set[int]
    backend: Backend

    def slot_valid(self, slot: int) -> bool:
        return FIRST_DATA_SLOT <= slot < self.state.slot_high


def _items(txn: Any, db: Any) -> Iterator[tuple[bytes, bytes]]:
    yield from txn.cursor(db=db).iternext(keys=True, values=True)


def read_snapshot(meta: Meta, backend: Backend) -> Snapshot:
    config, state = meta.read_header()
    with meta.env.begin(buffers=False) as txn:
        return Snapshot(
            config=config,
            state=state,
            map={key_int(k): MAP_ENTRY.unpack(v) for k, v in _items(txn, meta.map)},
            refs={key_int(k): REF.unpack(v) for k, v in _items(txn, meta.refs)},
            index={k: INDEX_ENTRY.unpack(v) for k, v in _items(txn, meta.index)},
            age={key_int(k): v for k, v in _items(txn, meta.age)},
            free={key_int(k) for k, _ in _items(txn, meta.free)},
            deferred={key_int(k) for k, _ in _items(txn, meta.deferred)},
            backend=backend,
        )


def _slot_counts(snap: Snapshot) -> Counter[int]:
    return Counter(value for kind, value in snap.map.values() if kind == KIND_SLOT)


def check_bounds(snap: Snapshot, progress: Progress) -> list[Problem]:
    out = []
    if snap.state.slot_high > snap.config.slot_capacity:
        out.append(
            Problem(
                "bounds",
                f"slot_high {snap.state.slot_high} beyond capacity {snap.config.slot_capacity}",
            )
        )
    for page, (kind, value) in snap.map.items():
        if page >= snap.config.pages:
            out.append(Problem("bounds", f"page {page} is beyond the device"))
        if kind == KIND_SLOT and not snap.slot_valid(value):
            out.append(Problem("bounds", f"page {page} maps to slot {value} outside the backend"))
        elif kind == KIND_FILL and value == 0:
            out.append(Problem("bounds", f"page {page} has a zero fill (zero pages are unmapped)"))
        elif kind not in (KIND_SLOT, KIND_FILL):
            out.append(Problem("bounds", f"page {page} has unknown mapping kind {kind}"))
    for slot in (*snap.refs, *snap.free, *snap.deferred):
        if not snap.slot_valid(slot):
            out.append(Problem("bounds", f"slot {slot} is recorded but outside the backend"))
    progress(len(snap.map))
    return out


def check_refcounts(snap: Snapshot, progress: Progress) -> list[Problem]:
    out = []
    counts = _slot_counts(snap)
    for slot, count in sorted(counts.items()):
        ref = snap.refs.get(slot)
        if ref is None:
            message = f"slot {slot} is mapped {count} times but has no refcount"
            out.append(Problem("refcounts", message))
        elif ref[0] != count:
            out.append(
                Problem("refcounts", f"slot {slot} has refcount {ref[0]} but {count} mappings")
            )
    for slot, (refcount, _) in sorted(snap.refs.items()):
        if slot not in counts:
            out.append(Problem("refcounts", f"slot {slot} has refcount {refcount} but no mapping"))
    progress(len(snap.refs))
    return out


def check_free_live(snap: Snapshot, progress: Progress) -> list[Problem]:
    live = set(snap.refs) | set(_slot_counts(snap))
    out = [
        Problem("free-live", f"slot {s} is both free and referenced")
        for s in sorted(snap.free & live)
    ]
    out += [
        Problem("free-live", f"slot {s} is both deferred and referenced")
        for s in sorted(snap.deferred & live)
    ]
    out += [
        Problem("free-live", f"slot {s} is both free and deferred")
        for s in sorted(snap.free & snap.deferred)
    ]
    progress(len(snap.free) + len(snap.deferred))
    return out


def check_leaks(snap: Snapshot, progress: Progress) -> list[Problem]:
    known = set(snap.refs) | snap.free | snap.deferred
    leaked = [s for s in range(FIRST_DATA_SLOT, snap.state.slot_high) if s not in known]
    progress(snap.state.slot_high)
    return [Problem("leaks", f"slot {slot} is neither referenced nor free") for slot in leaked]


def check_fingerprints(snap: Snapshot, progress: Progress) -> list[Problem]:
    out = []
    for slot, (_, fp) in sorted(snap.refs.items()):
        if snap.slot_valid(slot) and xxh3_128(snap.backend.read_slot(slot)) != fp:
            message = f"slot {slot}'s data does not match its fingerprint"
            out.append(Problem("fingerprints", message))
        progress(1)
    return out


def check_index(snap: Snapshot, progress: Progress) -> list[Problem]:
    out = []
    for fp, (slot, seq) in snap.index.items():
        if slot not in snap.refs or not snap.slot_valid(slot):
            out.append(Problem("index", f"index entry {fp.hex()} names dead slot {slot}"))
        elif xxh3_128(snap.backend.read_slot(slot)) != fp:
            out.append(Problem("index", f"index entry {fp.hex()}: slot {slot} holds other data"))
        if snap.config.max_index_entries and snap.age.get(seq) != fp:
            out.append(Problem("index", f"index entry {fp.hex()} has no age record {seq}"))
        progress(1)
    if snap.config.max_index_entries:
        for seq, fp in snap.age.items():
            entry = snap.index.get(fp)
            if entry is None or entry[1] != seq:
                out.append(Problem("index", f"age record {seq} names no index entry"))
    elif snap.age:
        out.append(Problem("index", f"{len(snap.age)} age records in an unbounded index"))
    return out


def check_counters(snap: Snapshot, progress: Progress) -> list[Problem]:
    kinds = Counter(kind for kind, _ in snap.map.values())
    out = []
    if snap.state.mapped_pages != kinds[KIND_SLOT]:
        out.append(
            Problem(
                "counters",
                f"mapped_pages is {snap.state.mapped_pages}, counted {kinds[KIND_SLOT]}",
            )
        )
    if snap.state.same_filled_pages != kinds[KIND_FILL]:
        out.append(
            Problem(
                "counters",
                f"same_filled_pages is {snap.state.same_filled_pages}, counted {kinds[KIND_FILL]}",
            )
        )
    progress(1)
    return out


CHECKS: dict[str, Callable[[Snapshot, Progress], list[Problem]]] = {
    "bounds": check_bounds,
    "refcounts": check_refcounts,
    "free-live": check_free_live,
    "leaks": check_leaks,
    "fingerprints": check_fingerprints,
    "index": check_index,
    "counters": check_counters,
}


def work_units(snap: Snapshot) -> int:
    """Roughly how many progress units the checks report (for a progress bar)."""
    return (
        len(snap.map)
        + len(snap.refs) * 2
        + len(snap.free)
        + len(snap.deferred)
        + snap.state.slot_high
        + len(snap.index)
        + 1
    )


def _repair(meta: Meta, snap: Snapshot) -> None:
    """Rebuild everything derived from the map (see the module docstring)."""
    config = snap.config
    slot_high = min(snap.state.slot_high, config.slot_capacity)
    keep_map = {
        page: (kind, value)
        for page, (kind, value) in snap.map.items()
        if page < config.pages
        and (
            (kind == KIND_SLOT and FIRST_DATA_SLOT <= value < slot_high)
            or (kind == KIND_FILL and value != 0)
        )
    }
    counts = Counter(value for kind, value in keep_map.values() if kind == KIND_SLOT)
    fingerprints = {slot: xxh3_128(snap.backend.read_slot(slot)) for slot in counts}
    index = {
        fp: entry
        for fp, entry in snap.index.items()
        if entry[0] in counts and fingerprints[entry[0]] == fp
    }

    def rebuild(txn: Any) -> None:
        for db in (meta.map, meta.refs, meta.index, meta.age, meta.free, meta.deferred):
            txn.drop(db, delete=False)
        for page, (kind, value) in sorted(keep_map.items()):
            txn.put(U64BE.pack(page), MAP_ENTRY.pack(kind, value), db=meta.map)
        for slot, count in sorted(counts.items()):
            txn.put(slot_key(slot), REF.pack(count, fingerprints[slot]), db=meta.refs)
        for slot in range(FIRST_DATA_SLOT, slot_high):
            if slot not in counts:
                txn.put(slot_key(slot), b"", db=meta.free)
        for fp, (slot, seq) in index.items():
            txn.put(fp, INDEX_ENTRY.pack(slot, seq), db=meta.index)
            if config.max_index_entries:
                txn.put(U64BE.pack(seq), fp, db=meta.age)
        next_seq = max([snap.state.next_seq, *(seq + 1 for _, seq in index.values())])
        kinds = Counter(kind for kind, _ in keep_map.values())
        state = State(slot_high, kinds[KIND_SLOT], kinds[KIND_FILL], next_seq, snap.state.clean)
        txn.put(KEY_STATE, state.pack(), db=meta.info)

    meta.write(rebuild)
    meta.sync()


@dataclass(frozen=True)
class CheckResult:
    problems: list[Problem]
    repaired: bool
    checks: tuple[str, ...]


def run_checks(
    meta: Meta,
    backend: Backend,
    *,
    repair: bool = False,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CheckResult:
    """Run every named check over an open environment and backend (the caller holds the store's
    lock). With ``repair``, fix what was found from the map and return the problems the repair
    fixed (a second check should then be clean)."""
    snap = read_snapshot(meta, backend)
    if on_total is not None:
        on_total(work_units(snap))
    report = progress or (lambda _n: None)
    problems = [p for check in CHECKS.values() for p in check(snap, report)]
    if repair and problems:
        _repair(meta, snap)
    return CheckResult(problems, repaired=repair and bool(problems), checks=tuple(CHECKS))
