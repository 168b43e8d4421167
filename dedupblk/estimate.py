"""What a store would hold if an image (a file or a block device) were imported into it, found by
reading the image once, front to back, in bounded memory (``dedupblk estimate``).

The counts are exact, by the format's rules (`dedupblk.store.format`): a page that is zeros takes
nothing, one that repeats a non-zero 8-byte word is kept inline, and every other content takes
``ceil(n / max_share)`` slots when ``n`` pages hold it (a slot serves at most ``max_share``
pages); a trailing partial page counts as a page padded with zeros, and a ``--size`` larger than
the image adds zero pages. The savings are computed by `dedupblk.store.stats` itself, from the
counters a store would hold, so they mean exactly what ``dedupblk stats`` says. Contents are told
apart by the first 8 bytes of their XXH3-128 fingerprint: two different contents share a prefix
with a probability of about ``n**2 / 2**65`` for ``n`` distinct contents (1 in 500 at a TiB of
distinct data), and each such pair would count one slot too few.

Memory is bounded whatever the image's size: each data page's 8-byte prefix goes into a run of at
most `RUN_SIZE` prefixes, which is sorted and appended to an unlinked temporary file when full;
the runs are then merged (``heapq.merge``, at most `FAN_IN` runs open at once, more are first
merged into longer runs) and equal prefixes counted as they pass. Held at once, at most: one run
(4 MiB as an array, and while it is sorted a list of Python ints, 48 bytes each: 24 MiB), a
`MERGE_BLOCK` of 64 KiB from each run being merged (4 MiB), two `READ_SIZE` buffers of the image
(2 MiB): under 35 MiB besides the interpreter (tracemalloc's peak counting 1.5 million distinct
prefixes: 30 MiB). tests/unit/test_estimate.py checks that the peak does not grow with the number
of distinct pages. The temporary files take 8 bytes a data page (0.2% of the data) in
``--temp-dir`` (default TMPDIR; on a tmpfs that is memory too). A sparse file's holes are skipped
(``SEEK_DATA``), not read.

The metadata (`metadata_bytes`) is LMDB's high-water mark of ``meta/data.mdb``, the figure
``stats`` shows, after an import in order from a model of the format's layout: one 4096-byte
overflow page per map chunk that holds a page that is not zeros, per refs chunk and per fps chunk
(slots are taken from 1 up); in leaf pages filled in key order, 30 bytes per map chunk and per
same-filled page, 26 per refs and fps chunk; 6 bytes of index per distinct content and 14 per
non-empty bucket, in leaf pages that inserts at random keys leave about 72% full (`RANDOM_FILL`,
measured); branch pages; 4 fixed pages. On top of the live pages, LMDB holds two copies of what
one commit rewrites (this commit's new pages, and those the last one freed, not reusable yet); an
import commits every 1024 device pages, which rewrites the index leaves its new contents fall in,
its map, refs and fps chunks and their leaves, and its fills. The estimate leaves out
``meta/lock.mdb`` and what overwrites, trims and a bounded index would change. Calibrated against
imports through `open_store(...).write` in 1 MiB pieces and a flush (``stats``, then estimate):

  image                                                       stats         estimate
  ext4 (``mkfs.ext4 -d``) of 24 MiB of /usr/share/doc, 64 MiB  360-397 KiB   408 KiB  (3 mkfs)
  ext4 of all of /usr/share/doc (143 MiB), 256 MiB             1440 KiB      1388 KiB
  ext4 of /usr/lib/python3.11 (54 MiB), 128 MiB                668 KiB       712 KiB
  256 MiB of random pages                                      2484 KiB      2564 KiB
  the same in a 4 GiB device (more index buckets)              4436 KiB      4604 KiB
  1 GiB of random pages                                        9112 KiB      8960 KiB
  64 MiB, 3 pages in 4 same-filled (each a new word), 1 random 768 KiB       800 KiB

so within -4% and +13%. An import over NBD (``qemu-img convert``) of the 64 MiB ext4 image reached
the same high-water mark as the import through the API.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import math
import os
import stat
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, cast

from .errors import DedupblkError, InvalidRequest
from .store.backend import device_size
from .store.fingerprint import FILL, ZERO, classify, xxh3_128
from .store.format import (
    DEFAULT_MAX_SHARE,
    FINGERPRINT_XXH3_128,
    FP_CHUNK_SLOTS,
    INDEX_ENTRY_BYTES,
    MAP_CHUNK_PAGES,
    MAX_SHARE,
    PAGE_SHIFT,
    PAGE_SIZE,
    REF_CHUNK_SLOTS,
    Config,
    State,
    index_bucket_bits,
)
from .store.meta import Meta
from .store.stats import Statistics, statistics_of

RUN_SIZE = 1 << 19  # prefixes sorted in memory at once
FAN_IN = 64  # runs merged at once
MERGE_BLOCK = 8192  # prefixes read from a run at a time (64 KiB)
READ_SIZE = 1 << 20  # bytes of the image read at a time
COMMIT_PAGES = 1024  # device pages an import commits at once (the store's GROUP_PAGES)

ProgressFn = Callable[[int], None]
_ZERO_READ = bytes(READ_SIZE)
_ZERO_VIEW = memoryview(_ZERO_READ)


class DistinctCounter:
    """How many times each 64-bit key was added, in bounded memory (see the module docstring):
    `add` every key, then `multiplicities` once. ``peak_held`` and ``runs_written`` say how much
    was held in memory at once and how many runs went to disk."""

    def __init__(
        self,
        temp_dir: str | None = None,
        *,
        run_size: int = RUN_SIZE,
        fan_in: int = FAN_IN,
        merge_block: int = MERGE_BLOCK,
    ) -> None:
        if run_size < 1 or fan_in < 2 or merge_block < 1:
            raise InvalidRequest(f"bad run size {run_size}, fan-in {fan_in} or block {merge_block}")
        self.temp_dir = temp_dir
        self.run_size = run_size
        self.fan_in = fan_in
        self.merge_block = merge_block
        self._held = array("Q")
        self._file: IO[bytes] | None = None  # the runs of the first level, one after another
        self._runs: list[tuple[int, int]] = []  # (offset, keys) in _file
        self.peak_held = 0
        self.runs_written = 0

    def add(self, key: int) -> None:
        held = self._held
        held.append(key)
        if len(held) >= self.run_size:
            self.peak_held = max(self.peak_held, len(held))
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = self._temporary()
        keys = sorted(self._held)
        self._held = array("Q")  # freed before the sorted copy is packed
        run = array("Q", keys)
        del keys
        offset = self._file.seek(0, os.SEEK_END)
        self._write(self._file, run)
        self._runs.append((offset, len(run)))
        self.runs_written += 1

    def _temporary(self) -> IO[bytes]:
        try:
            return tempfile.TemporaryFile(dir=self.temp_dir)  # unlinked: gone with the process
        except OSError as exc:
            where = self.temp_dir or tempfile.gettempdir()
            raise DedupblkError(
                f"cannot make a temporary file in {where}: {exc.strerror}", errno=exc.errno
            ) from exc

    def _write(self, file: IO[bytes], keys: array[int]) -> None:
        try:
            file.write(keys.tobytes())
        except OSError as exc:
            raise DedupblkError(
                f"writing sorted fingerprints to a temporary file: {exc.strerror}", errno=exc.errno
            ) from exc

    def multiplicities(self) -> Iterator[int]:
        """The number of times each distinct key was added, in key order."""
        self.peak_held = max(self.peak_held, len(self._held))
        last: int | None = None
        count = 0
        for key in self._merged():
            if key == last:
                count += 1
                continue
            if count:
                yield count
            last, count = key, 1
        if count:
            yield count

    def _merged(self) -> Iterator[int]:
        file, runs = self._file, self._runs
        while file is not None and len(runs) >= self.fan_in:  # leave room for the held run
            file, runs = self._merge_level(file, runs)
        held = sorted(self._held)
        self._held = array("Q")
        if file is None:
            yield from held
            return
        with file:
            file.flush()
            yield from heapq.merge(*(self._read(file, run) for run in runs), held)

    def _merge_level(
        self, file: IO[bytes], runs: list[tuple[int, int]]
    ) -> tuple[IO[bytes], list[tuple[int, int]]]:
        """Merge the runs ``fan_in`` at a time into a new file; the old one is closed."""
        merged = self._temporary()
        out: list[tuple[int, int]] = []
        with file:
            file.flush()
            for first in range(0, len(runs), self.fan_in):
                group = runs[first : first + self.fan_in]
                offset = merged.seek(0, os.SEEK_END)
                block = array("Q")
                for key in heapq.merge(*(self._read(file, run) for run in group)):
                    block.append(key)
                    if len(block) >= self.merge_block:
                        self._write(merged, block)
                        block = array("Q")
                self._write(merged, block)
                out.append((offset, sum(keys for _, keys in group)))
                self.runs_written += 1
        return merged, out

    def _read(self, file: IO[bytes], run: tuple[int, int]) -> Iterator[int]:
        offset, left = run
        fd = file.fileno()
        while left:
            n = min(left, self.merge_block)
            raw = os.pread(fd, n * 8, offset)
            if len(raw) != n * 8:
                raise DedupblkError("a temporary file of sorted fingerprints came back short")
            block = array("Q")
            block.frombytes(raw)
            yield from block
            offset += n * 8
            left -= n


@dataclass(frozen=True)
class Layout:
    """What the metadata's size follows from, counted while the image is read."""

    map_chunks: int  # map chunks holding a page that is not zeros
    commit_data_pages: int  # most data pages in one group of `COMMIT_PAGES` device pages
    commit_fill_pages: int  # most same-filled pages in one such group


@dataclass(frozen=True)
class Estimate:
    """The ``stats`` a store would show after the image was imported into it (a store of
    ``statistics.size_bytes`` with the default backend and ``max_share``), and what was read."""

    image: str
    image_bytes: int
    max_share: int
    statistics: Statistics
    layout: Layout

    def record(self) -> dict[str, Any]:
        """The JSON of ``dedupblk estimate``: the keys of ``stats --json`` (bytes and counts as
        integers) and the image's own."""
        return {
            "image": self.image,
            "image_bytes": self.image_bytes,
            "max_share": self.max_share,
            **asdict(self.statistics),
        }


def estimate_image(
    path: str,
    *,
    size: int | None = None,
    max_share: int = DEFAULT_MAX_SHARE,
    temp_dir: str | None = None,
    progress: ProgressFn | None = None,
    on_total: ProgressFn | None = None,
    counter: DistinctCounter | None = None,
) -> Estimate:
    """Read ``path`` (a regular file or a block device) once and count what a store of ``size``
    bytes (default: the image's size rounded up to a page) would hold after the image was written
    into it from offset 0. ``on_total`` is called once with the device's bytes, ``progress``
    with the bytes covered since (holes included). ``counter`` (a new, empty one) replaces the
    default `DistinctCounter` in ``temp_dir``: tests shrink its sizes and read its counts."""
    if not 1 <= max_share <= MAX_SHARE:
        raise InvalidRequest(f"bad max-share {max_share}: 1 to {MAX_SHARE}")
    fd = _open_image(path)
    try:
        image_bytes = device_size(fd)
        rounded = -(-image_bytes // PAGE_SIZE) * PAGE_SIZE
        if size is None:
            size = rounded
        elif size % PAGE_SIZE or size < rounded:
            raise InvalidRequest(
                f"bad size {size}: a multiple of {PAGE_SIZE}, at least the image's {rounded}"
            )
        if on_total is not None:
            on_total(size)
        if counter is None:
            counter = DistinctCounter(temp_dir)
        scan = _Scan(counter)
        covered = 0
        for start, end in _data_ranges(fd, path, image_bytes):
            if progress is not None and start > covered:
                progress(start - covered)  # a hole
            for offset, data in _read_range(fd, path, start, end, image_bytes):
                scan.pages(offset >> PAGE_SHIFT, data)
                if progress is not None:
                    progress(len(data))
            covered = end
        if progress is not None and size > covered:
            progress(size - covered)
    finally:
        os.close(fd)
    scan.close_group()
    distinct = stored = 0
    for count in counter.multiplicities():
        distinct += 1
        stored += -(-count // max_share)
    pages = size // PAGE_SIZE
    slot_capacity = default_slot_capacity(size)
    bucket_bits = index_bucket_bits(slot_capacity, 0)
    layout = Layout(scan.map_chunks, scan.most_data, scan.most_fills)
    metadata = metadata_bytes(
        mapped_pages=scan.data,
        same_filled_pages=scan.fills,
        stored_slots=stored,
        index_entries=distinct,
        bucket_bits=bucket_bits,
        layout=layout,
    )
    config = Config(
        size=size,
        page_size=PAGE_SIZE,
        slot_capacity=slot_capacity,
        max_index_entries=0,
        max_share=max_share,
        fingerprint=FINGERPRINT_XXH3_128,
        uuid=bytes(16),
        bucket_bits=bucket_bits,
        backend="",
    )
    state = State(scan.data, scan.fills, 0, stored, distinct, clean=1)
    # statistics_of reads one thing from an environment, its used bytes: the estimate stands
    # in for it, so that every other figure comes from the one definition the store uses.
    statistics = statistics_of(cast(Meta, _EstimatedMeta(metadata)), config, state)
    assert statistics.zero_pages == pages - scan.data - scan.fills
    return Estimate(path, image_bytes, max_share, statistics, layout)


class _EstimatedMeta:
    def __init__(self, used: int) -> None:
        self.used = used

    def used_bytes(self) -> int:
        return self.used


class _Scan:
    """Per-page classification of what is read, in page order; data pages' prefixes go to the
    counter."""

    def __init__(self, counter: DistinctCounter) -> None:
        self.counter = counter
        self.data = 0
        self.fills = 0
        self.map_chunks = 0
        self._chunk = -1  # the last map chunk counted
        self._group = -1  # the commit group being counted, its data and fill pages
        self._group_data = 0
        self._group_fills = 0
        self.most_data = 0
        self.most_fills = 0

    def pages(self, first: int, data: bytes) -> None:
        """Count the pages of ``data`` (a whole number of pages), the first being page
        ``first``."""
        if data == _ZERO_VIEW[: len(data)]:
            return
        add = self.counter.add
        for at in range(0, len(data), PAGE_SIZE):
            page = data[at : at + PAGE_SIZE]
            kind = classify(page)[0]
            if kind == ZERO:
                continue
            number = first + (at >> PAGE_SHIFT)
            chunk = number // MAP_CHUNK_PAGES
            if chunk != self._chunk:
                self._chunk = chunk
                self.map_chunks += 1
            group = number // COMMIT_PAGES
            if group != self._group:
                self.close_group()
                self._group = group
            if kind == FILL:
                self.fills += 1
                self._group_fills += 1
            else:
                self.data += 1
                self._group_data += 1
                add(int.from_bytes(xxh3_128(page)[:8], "big"))

    def close_group(self) -> None:
        self.most_data = max(self.most_data, self._group_data)
        self.most_fills = max(self.most_fills, self._group_fills)
        self._group_data = self._group_fills = 0


def _open_image(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DedupblkError(f"cannot open {path}: {exc.strerror}", errno=exc.errno) from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise InvalidRequest(f"{path} is neither a regular file nor a block device")
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def _data_ranges(fd: int, path: str, image_bytes: int) -> Iterator[tuple[int, int]]:
    """Page-aligned byte ranges, in order, covering every byte of the image that is not a hole
    (a block device, or a filesystem without ``SEEK_DATA``: the whole image)."""
    end_of_image = -(-image_bytes // PAGE_SIZE) * PAGE_SIZE
    at = 0
    while at < image_bytes:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here on
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield at, end_of_image
                return
            raise DedupblkError(f"reading {path}: {exc.strerror}", errno=exc.errno) from exc
        start = max(at, data // PAGE_SIZE * PAGE_SIZE)
        end = min(end_of_image, -(-hole // PAGE_SIZE) * PAGE_SIZE)
        yield start, end
        at = end


def _read_range(
    fd: int, path: str, start: int, end: int, image_bytes: int
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of ``[start, end)`` in `READ_SIZE` pieces, the image's last partial page
    padded with zeros."""
    offset = start
    while offset < end:
        want = min(READ_SIZE, end - offset)
        readable = min(want, image_bytes - offset)
        try:
            data = os.pread(fd, readable, offset)
            while len(data) < readable:
                more = os.pread(fd, readable - len(data), offset + len(data))
                if not more:
                    raise DedupblkError(f"{path} ended at byte {offset + len(data)} while read")
                data += more
        except OSError as exc:
            raise DedupblkError(
                f"reading {path} at byte {offset}: {exc.strerror}", errno=exc.errno
            ) from exc
        if readable < want:
            data += bytes(want - readable)
        yield offset, data
        offset += want


def default_slot_capacity(size: int) -> int:
    """Slots of the backend `dedupblk.store.create_store` makes for a device of ``size`` bytes
    when none is given (the header slot, the device's pages and a quarter more)."""
    return (PAGE_SIZE + size + (size // 4) // PAGE_SIZE * PAGE_SIZE) // PAGE_SIZE


# LMDB's layout (mdb.c): a page of 4096 bytes has a 16-byte header; a node is an 8-byte header,
# the key and the value (for a value on overflow pages, its 8-byte page number), padded to an
# even size, plus a 2-byte pointer in its page.
LMDB_PAGE = 4096
LMDB_USABLE = 4080
FIXED_PAGES = 4  # two meta pages, the main database's leaf, the info leaf
COMMIT_FIXED_PAGES = 2.0  # pages every commit rewrites: the info and main leaves
RANDOM_FILL = 0.72  # of leaf pages that inserts at random keys split (measured; ~ln 2 in theory)
ORDERED_FILL = 1.0  # of leaf pages appended to in key order (LMDB splits at the end)


def _node(key: int, value: int) -> int:
    return ((8 + key + value + 1) & ~1) + 2


def _leaves(entries: int, node: int, fill: float) -> int:
    return math.ceil(entries * node / (LMDB_USABLE * fill)) if entries else 0


def _branches(leaves: int, key: int, fill: float) -> int:
    per_page = max(2, int(LMDB_USABLE // _node(key, 0) * fill))
    total = 0
    while leaves > 1:
        leaves = -(-leaves // per_page)
        total += leaves
    return total


def metadata_bytes(
    *,
    mapped_pages: int,
    same_filled_pages: int,
    stored_slots: int,
    index_entries: int,
    bucket_bits: int,
    layout: Layout,
) -> int:
    """LMDB's high-water mark after an import in order (see the module docstring)."""
    ref_chunks = stored_slots // REF_CHUNK_SLOTS + 1 if stored_slots else 0
    fp_chunks = stored_slots // FP_CHUNK_SLOTS + 1 if stored_slots else 0
    buckets = 1 << bucket_bits
    used_buckets = buckets * (1 - (1 - 1 / buckets) ** index_entries)  # expected, at random
    index_bytes = used_buckets * _node(4, 0) + index_entries * INDEX_ENTRY_BYTES
    # database: (leaf pages, overflow pages, key bytes, leaf fill)
    trees = {
        "map": (_leaves(layout.map_chunks, _node(12, 8), ORDERED_FILL), layout.map_chunks, 12),
        "refs": (_leaves(ref_chunks, _node(8, 8), ORDERED_FILL), ref_chunks, 8),
        "fps": (_leaves(fp_chunks, _node(8, 8), ORDERED_FILL), fp_chunks, 8),
        "fills": (_leaves(same_filled_pages, _node(12, 8), ORDERED_FILL), 0, 12),
        "index": (math.ceil(index_bytes / (LMDB_USABLE * RANDOM_FILL)), 0, 4),
    }
    branches = {
        name: _branches(leaves, key, RANDOM_FILL if name == "index" else ORDERED_FILL)
        for name, (leaves, _, key) in trees.items()
    }
    live = FIXED_PAGES + sum(leaves + overflow for leaves, overflow, _ in trees.values())
    live += sum(branches.values())
    # What one commit rewrites (expected pages): the index leaves its new contents fall in, the
    # one or two map chunks of its 1024 pages, the refs and fps chunks of its new slots (taken
    # in order), the fills leaves of its same-filled pages, each with its leaf and branches.
    per_data_page = 1 / mapped_pages if mapped_pages else 0.0
    new_entries = layout.commit_data_pages * index_entries * per_data_page
    new_slots = layout.commit_data_pages * stored_slots * per_data_page
    index_leaves = trees["index"][0]
    touched = {
        "map": min(layout.map_chunks, 1 + (COMMIT_PAGES - 1) / MAP_CHUNK_PAGES),
        "refs": min(ref_chunks, 1 + max(0.0, new_slots - 1) / REF_CHUNK_SLOTS),
        "fps": min(fp_chunks, 1 + max(0.0, new_slots - 1) / FP_CHUNK_SLOTS),
        "fills": layout.commit_fill_pages * _node(12, 8) / LMDB_USABLE,
        "index": -index_leaves * math.expm1(-new_entries / index_leaves) if index_leaves else 0,
    }
    rewritten = COMMIT_FIXED_PAGES
    for name, (leaves, overflow, _) in trees.items():
        if leaves:
            rewritten += touched[name] + branches[name] + (1 if overflow else 0)
    return (live + 2 * math.ceil(rewritten)) * LMDB_PAGE


def describe(estimate: Estimate) -> list[str]:
    """The table ``dedupblk estimate`` prints for people."""
    s = estimate.statistics
    rows = [
        ("image", "", f"{estimate.image} ({human_bytes(estimate.image_bytes)})"),
        ("device pages", f"{s.size_bytes // PAGE_SIZE}", human_bytes(s.size_bytes)),
        ("zero pages", f"{s.zero_pages}", human_bytes(s.zero_pages * PAGE_SIZE)),
        ("same-filled pages", f"{s.same_filled_pages}", "inline, no slot"),
        ("data pages", f"{s.mapped_pages}", human_bytes(s.mapped_pages * PAGE_SIZE)),
        ("distinct contents", f"{s.index_entries}", ""),
        ("stored pages", f"{s.stored_pages}", f"{human_bytes(s.stored_bytes)} in slots"),
        ("logical", "", human_bytes(s.logical_bytes)),
        ("saved", "", f"{human_bytes(s.saved_bytes)} ({s.saving_percent:.1f}%)"),
        ("dedup ratio", "", f"{s.dedup_ratio:.2f}" if s.dedup_ratio is not None else "-"),
        ("metadata", "", f"{human_bytes(s.metadata_bytes)} (estimated)"),
        ("max share", f"{estimate.max_share}", ""),
    ]
    label = max(len(row[0]) for row in rows)
    count = max(len(row[1]) for row in rows)
    return [f"{a:<{label}}  {b:>{count}}  {c}".rstrip() for a, b, c in rows]


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``0 B``, ``512 B``, ``4.0 KiB``, ``1.50 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
