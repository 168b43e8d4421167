"""``dedupblk check``: the invariants of `dedupblk.store.format`, one named check each.

The checks run on an open store (`Store.check`), under its lock: shared for a check, exclusive
for a repair, so they never race a writer. They are handed the store's open environment and
backend and open nothing themselves. What ``--repair`` rebuilds, and why it never makes damaged
data good, is the format's "Repair": damaged data is reported by device byte range.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmdb import verify as lmdb_verify

from ..errors import DedupblkError
from .backend import Backend
from .fingerprint import xxh3_128
from .format import (
    FILL_ENTRY,
    FILL_KEY,
    FIRST_DATA_SLOT,
    FP_CHUNK_SLOTS,
    INDEX_ENTRY_BYTES,
    KEY_STATE,
    LOST_ENTRY,
    MAP_CHUNK_PAGES,
    MAP_KEY,
    MAX_SHARE,
    PAGE_SHIFT,
    REF_CHUNK_SLOTS,
    U32BE,
    U64BE,
    U64LE,
    VOLUME,
    Config,
    State,
    map_key,
)
from .meta import Meta

Progress = Callable[[int], None]
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")

CHECK_NAMES = ("lmdb", "bounds", "refcounts", "fingerprints", "index", "counters")


@dataclass(frozen=True)
class Problem:
    check: str
    message: str


@dataclass(frozen=True)
class CheckResult:
    problems: list[Problem]
    repaired: bool
    checks: tuple[str, ...]
    lost: list[tuple[int, int]] = field(default_factory=list)  # (first byte, bytes) now EIO
    unrepairable: bool = False  # the LMDB file itself is damaged: repair cannot rebuild from it


def byte_ranges(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted pages folded into (first byte, length) runs."""
    out: list[tuple[int, int]] = []
    for page in sorted(pages):
        start = page << PAGE_SHIFT
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + (1 << PAGE_SHIFT))
        else:
            out.append((start, 1 << PAGE_SHIFT))
    return out


def describe_range(first: int, length: int) -> str:
    last = first + length - 1
    return f"bytes {first}-{last} (pages {first >> PAGE_SHIFT}-{last >> PAGE_SHIFT})"


@dataclass
class _Scan:
    """What the checks learned, and what a repair must change."""

    config: Config
    state: State
    problems: list[Problem] = field(default_factory=list)
    references: array[int] = field(default_factory=lambda: array("I"))  # slot -> map entries
    fill_pages: set[int] = field(default_factory=set)  # pages whose entry is FILL
    counted: dict[str, int] = field(default_factory=dict)
    lost_pages: set[int] = field(default_factory=set)  # entries a repair turns into LOST
    bad_keys: list[tuple[Any, bytes]] = field(default_factory=list)  # (db, key) a repair drops
    short_chunks: dict[int, int] = field(default_factory=dict)  # map chunk -> entries it has
    beyond: set[int] = field(default_factory=set)  # pages past the device's end a repair zeroes
    damaged_slots: set[int] = field(default_factory=set)  # live slots whose data fails its word
    tags: dict[int, bytes] = field(default_factory=dict)  # live slot -> tag of its data
    keep_index: dict[int, bytes] = field(default_factory=dict)  # bucket -> entries a repair keeps

    def problem(self, check: str, message: str) -> None:
        self.problems.append(Problem(check, message))


def _cursor(txn: Any, db: Any) -> Iterator[tuple[bytes, bytes]]:
    for key, value in txn.cursor(db=db):
        yield bytes(key), bytes(value)


def _map_entries(
    txn: Any, meta: Meta, scan: _Scan, progress: Progress, *, report: bool = True
) -> Iterator[tuple[int, int]]:
    """(page, entry) of every non-zero map entry of volume 0; bad records are reported (unless
    ``report`` is False: a second pass) and a chunk of the wrong size yields what it holds."""
    config = scan.config
    chunks = -(-config.pages // MAP_CHUNK_PAGES)
    for key, chunk in _cursor(txn, meta.map):
        volume, chunk_no = MAP_KEY.unpack(key) if len(key) == MAP_KEY.size else (-1, -1)
        if volume != VOLUME or not 0 <= chunk_no < chunks:
            if report:
                scan.problem("bounds", f"map record {key.hex()} is not a chunk of the device")
                scan.bad_keys.append((meta.map, key))
            continue
        if len(chunk) != MAP_CHUNK_PAGES * 4:
            held = min(MAP_CHUNK_PAGES, len(chunk) // 4)
            if report:
                scan.problem("bounds", f"map chunk {chunk_no} has {len(chunk)} bytes, not "
                             f"{MAP_CHUNK_PAGES * 4}")  # fmt: skip
                scan.short_chunks[chunk_no] = held
            chunk = chunk[: held * 4]  # noqa: PLW2901 -- what it holds
        first = chunk_no * MAP_CHUNK_PAGES
        for i, (entry,) in enumerate(_U32.iter_unpack(chunk)):
            if entry:
                yield first + i, entry
        progress(1)


def check_bounds_and_map(txn: Any, meta: Meta, scan: _Scan, progress: Progress) -> None:
    """bounds: entries, fills and refs chunks within the device and the backend."""
    config = scan.config
    capacity = config.slot_capacity
    scan.references = array("I", bytes(4 * capacity))
    mapped = fills = lost = 0
    for page, entry in _map_entries(txn, meta, scan, progress):
        if page >= config.pages:
            scan.problem("bounds", f"page {page} is beyond the device")
            scan.beyond.add(page)
        elif entry == FILL_ENTRY:
            fills += 1
            scan.fill_pages.add(page)
        elif entry == LOST_ENTRY:
            lost += 1
        elif entry >= capacity:
            scan.problem("bounds", f"{describe_range(page << PAGE_SHIFT, 1 << PAGE_SHIFT)} name "
                         f"slot {entry}, outside the backend")  # fmt: skip
            scan.lost_pages.add(page)
        else:
            mapped += 1
            scan.references[entry] += 1
    scan.counted.update(mapped=mapped, fills=fills, lost=lost)
    seen: set[int] = set()
    for key, value in _cursor(txn, meta.fills):
        volume, page = FILL_KEY.unpack(key) if len(key) == FILL_KEY.size else (-1, -1)
        word = U64LE.unpack(value)[0] if len(value) == U64LE.size else 0
        if volume != VOLUME or page not in scan.fill_pages or not word:
            scan.problem("bounds", f"fill record {key.hex()} has no FILL entry or no word")
            scan.bad_keys.append((meta.fills, key))
            continue
        seen.add(page)
    for page in sorted(scan.fill_pages - seen):
        scan.problem("bounds", f"{describe_range(page << PAGE_SHIFT, 1 << PAGE_SHIFT)}: the fill "
                     "word is missing")  # fmt: skip
        scan.lost_pages.add(page)
    ref_chunks = -(-capacity // REF_CHUNK_SLOTS)
    fp_chunks = -(-capacity // FP_CHUNK_SLOTS)
    for db, name, most in ((meta.refs, "refs", ref_chunks), (meta.fps, "fps", fp_chunks)):
        for key, _ in _cursor(txn, db):
            if len(key) != U64BE.size or U64BE.unpack(key)[0] >= most:
                scan.problem("bounds", f"{name} record {key.hex()} is beyond the backend")
                scan.bad_keys.append((db, key))


def _chunked(txn: Any, db: Any, width: int, per_chunk: int) -> Callable[[int], int]:
    """Entry lookup over chunked records of ``width``-byte entries (absent: 0)."""
    cache: dict[int, bytes | None] = {}
    fmt = {1: "B", 4: "<I"}[width]

    def lookup(n: int) -> int:
        chunk_no, i = divmod(n, per_chunk)
        if chunk_no not in cache:
            raw = txn.get(U64BE.pack(chunk_no), db=db)
            cache.clear()  # one chunk at a time: lookups come in slot order
            cache[chunk_no] = bytes(raw) if raw is not None else None
        chunk = cache[chunk_no]
        if chunk is None or len(chunk) < (i + 1) * width:
            return 0
        value: int = struct.unpack_from(fmt, chunk, i * width)[0]
        return value

    return lookup


def check_refcounts(txn: Any, meta: Meta, scan: _Scan, progress: Progress) -> None:
    """refcounts: every slot's refcount is the number of map entries naming it."""
    refcount = _chunked(txn, meta.refs, 1, REF_CHUNK_SLOTS)
    for slot in range(FIRST_DATA_SLOT, scan.config.slot_capacity):
        stored, named = refcount(slot), scan.references[slot]
        if stored != named:
            scan.problem("refcounts", f"slot {slot} has refcount {stored} but {named} mappings")
    progress(1)


def check_fingerprints(
    txn: Any, meta: Meta, backend: Backend, scan: _Scan, progress: Progress
) -> None:
    """fingerprints: every live slot's data hashes to its ``fps`` word."""
    word = _chunked(txn, meta.fps, 4, FP_CHUNK_SLOTS)
    for slot in range(FIRST_DATA_SLOT, scan.config.slot_capacity):
        if not scan.references[slot]:
            continue
        try:
            fp = xxh3_128(backend.read_slot(slot))
        except DedupblkError as exc:
            scan.problem("fingerprints", f"slot {slot} cannot be read: {exc}")
            scan.damaged_slots.add(slot)
            progress(1)
            continue
        if int.from_bytes(fp[:4], "big") != word(slot):
            scan.damaged_slots.add(slot)
        scan.tags[slot] = fp[4:6]
        progress(1)


def check_index(txn: Any, meta: Meta, scan: _Scan, progress: Progress) -> None:
    """index: entries name live slots of their bucket with their tag; no slot twice."""
    config = scan.config
    word = _chunked(txn, meta.fps, 4, FP_CHUNK_SLOTS)
    shift = 32 - config.bucket_bits
    indexed: set[int] = set()
    entries = 0
    for key, value in _cursor(txn, meta.index):
        bucket = U32BE.unpack(key)[0] if len(key) == U32BE.size else -1
        if bucket < 0 or bucket >= 1 << config.bucket_bits or len(value) % INDEX_ENTRY_BYTES:
            scan.problem("index", f"index record {key.hex()} is malformed")
            continue
        n = len(value) // INDEX_ENTRY_BYTES
        kept = bytearray()
        kept_slots = bytearray()
        for i in range(n):
            tag = value[i * 2 : i * 2 + 2]
            slot: int = _U32.unpack_from(value, n * 2 + i * 4)[0]
            entries += 1
            why = None
            if not FIRST_DATA_SLOT <= slot < config.slot_capacity or not scan.references[slot]:
                why = f"names slot {slot}, which is not live"
            elif slot in scan.damaged_slots:
                why = f"names slot {slot}, whose data is damaged"
            elif word(slot) >> shift != bucket:
                why = f"names slot {slot}, which belongs to another bucket"
            elif scan.tags.get(slot) != tag:
                why = f"names slot {slot}, whose data has another tag"
            elif slot in indexed:
                why = f"names slot {slot} a second time"
            if why is not None:
                scan.problem("index", f"an entry of bucket {bucket} {why}")
                continue
            indexed.add(slot)
            kept += tag
            kept_slots += _U32.pack(slot)
        scan.keep_index[bucket] = bytes(kept + kept_slots)
        progress(1)
    scan.counted["index"] = entries
    scan.counted["indexed"] = len(indexed)


def check_counters(scan: _Scan) -> None:
    """counters: ``state`` equals what was counted."""
    state, counted = scan.state, scan.counted
    live = sum(1 for n in scan.references if n)
    for name, have, want in (
        ("mapped_pages", state.mapped_pages, counted["mapped"]),
        ("same_filled_pages", state.same_filled_pages, counted["fills"]),
        ("lost_pages", state.lost_pages, counted["lost"]),
        ("stored_slots", state.stored_slots, live),
        ("index_entries", state.index_entries, counted["index"]),
    ):
        if have != want:
            scan.problem("counters", f"{name} is {have}, counted {want}")


def _report_damage(meta: Meta, txn: Any, scan: _Scan) -> None:
    """Name the device ranges whose data is damaged (pages mapping a damaged slot), and the
    mappings past what a refcount can count (`MAX_SHARE`), which a repair cannot keep."""
    over = {slot for slot, n in enumerate(scan.references) if n > MAX_SHARE}
    if not scan.damaged_slots and not over:
        return
    damaged: list[int] = []
    seen: dict[int, int] = {}
    entries = _map_entries(txn, meta, scan, lambda _n: None, report=False)
    for page, entry in entries:
        if page >= scan.config.pages:
            continue
        if entry in scan.damaged_slots:
            damaged.append(page)
        elif entry in over:
            seen[entry] = seen.get(entry, 0) + 1
            if seen[entry] > MAX_SHARE:
                scan.lost_pages.add(page)
    for slot in over:
        scan.references[slot] = MAX_SHARE
        scan.problem("refcounts", f"slot {slot} is named by more pages than a refcount counts")
    scan.lost_pages.update(damaged)
    for first, length in byte_ranges(damaged):
        scan.problem("fingerprints", f"{describe_range(first, length)}: the data does not "
                     "match its fingerprint")  # fmt: skip


def damaged_structure(meta_dir: str) -> CheckResult | None:
    """The first check alone, read from the file: what `run_checks` returns for an LMDB file
    whose pages do not form the B-trees LMDB would walk (unrepairable), or None."""
    structure = lmdb_verify.verify(meta_dir)
    if not structure:
        return None
    problems = [Problem("lmdb", message) for message in structure]
    return CheckResult(problems, repaired=False, checks=CHECK_NAMES, unrepairable=True)


def run_checks(
    meta: Meta,
    backend: Backend,
    *,
    repair: bool = False,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CheckResult:
    """Run every named check over an open environment and backend (the caller holds the store's
    lock). With ``repair``, fix what was found (see the format's "Repair") and return the
    problems the repair fixed (a second check should then be clean)."""
    report = progress or (lambda _n: None)
    damaged = damaged_structure(meta.env.path())
    if damaged is not None:
        return damaged
    config, state = meta.read_header()
    scan = _Scan(config, state)
    with meta.env.begin(buffers=True) as txn:
        if on_total is not None:
            chunks, buckets = meta.entries(txn, meta.map), meta.entries(txn, meta.index)
            on_total(chunks + state.stored_slots + buckets + 1)
        check_bounds_and_map(txn, meta, scan, report)
        check_refcounts(txn, meta, scan, report)
        check_fingerprints(txn, meta, backend, scan, report)
        _report_damage(meta, txn, scan)
        check_index(txn, meta, scan, report)
        check_counters(scan)
    if not repair or not scan.problems:
        return CheckResult(scan.problems, repaired=False, checks=CHECK_NAMES)
    _repair(meta, scan)
    return CheckResult(
        scan.problems, repaired=True, checks=CHECK_NAMES, lost=byte_ranges(scan.lost_pages)
    )


def _repair(meta: Meta, scan: _Scan) -> None:
    """Rebuild what is derived; turn damaged pages into LOST entries (the format's "Repair")."""
    config = scan.config
    lost = scan.lost_pages
    for slot in scan.damaged_slots:
        scan.references[slot] = 0
    for chunk_no, held in scan.short_chunks.items():  # the pages whose entries are missing
        first = chunk_no * MAP_CHUNK_PAGES
        lost.update(range(first + held, min(config.pages, first + MAP_CHUNK_PAGES)))
    changes: dict[int, list[tuple[int, int]]] = {c: [] for c in scan.short_chunks}
    for page in lost:
        changes.setdefault(page // MAP_CHUNK_PAGES, []).append((page, LOST_ENTRY))
    for page in scan.beyond:
        changes.setdefault(page // MAP_CHUNK_PAGES, []).append((page, 0))

    def rebuild(txn: Any) -> None:
        mapped = fills = lost_count = 0
        for db, key in scan.bad_keys:
            txn.delete(key, db=db)
        for chunk_no, chunk_changes in changes.items():
            raw = txn.get(map_key(chunk_no), db=meta.map)
            marked = bytearray(bytes(raw or b"")[: MAP_CHUNK_PAGES * 4]).ljust(
                MAP_CHUNK_PAGES * 4, b"\0"
            )
            for page, entry in chunk_changes:
                _U32.pack_into(marked, (page % MAP_CHUNK_PAGES) * 4, entry)
            txn.put(map_key(chunk_no), marked, db=meta.map)
        records = list(_cursor(txn, meta.map))
        for key, chunk in records:
            volume, chunk_no = MAP_KEY.unpack(key) if len(key) == MAP_KEY.size else (VOLUME + 1, 0)
            if (
                volume != VOLUME
                or chunk_no * MAP_CHUNK_PAGES >= config.pages
                or len(chunk) != MAP_CHUNK_PAGES * 4
            ):
                txn.delete(key, db=meta.map)
                continue
            for (entry,) in _U32.iter_unpack(chunk):
                if entry == FILL_ENTRY:
                    fills += 1
                elif entry == LOST_ENTRY:
                    lost_count += 1
                elif entry:
                    mapped += 1
        txn.drop(meta.refs, delete=False)
        capacity = config.slot_capacity
        for chunk_no in range(-(-capacity // REF_CHUNK_SLOTS)):
            first = chunk_no * REF_CHUNK_SLOTS
            counts = scan.references[first : min(capacity, first + REF_CHUNK_SLOTS)]
            if any(counts):
                chunk_refs = bytes(min(n, MAX_SHARE) for n in counts)
                txn.put(
                    U64BE.pack(chunk_no), chunk_refs.ljust(REF_CHUNK_SLOTS, b"\0"), db=meta.refs
                )
        txn.drop(meta.index, delete=False)
        entries = 0
        for bucket, value in scan.keep_index.items():
            n = len(value) // INDEX_ENTRY_BYTES
            live = [
                i for i in range(n)
                if scan.references[_U32.unpack_from(value, n * 2 + i * 4)[0]]
            ]  # fmt: skip
            if live:
                tags = b"".join(value[i * 2 : i * 2 + 2] for i in live)
                slots = b"".join(value[n * 2 + i * 4 : n * 2 + i * 4 + 4] for i in live)
                txn.put(U32BE.pack(bucket), tags + slots, db=meta.index)
                entries += len(live)
        live_slots = sum(1 for n in scan.references if n)
        state = State(mapped, fills, lost_count, live_slots, entries, scan.state.clean)
        txn.put(KEY_STATE, state.pack(), db=meta.info)

    meta.write(rebuild)
    meta.sync()
