"""The workload of bench/ram_bench.py: K "containers" of real library files, and its floor.

Imported by both sides (bench/ is sys.path[0] for bench/ram_bench.py on the host and for
bench/ram_guest.py in the guest, which sees the host's root read-only over 9p, so both read the
same /usr/lib/x86_64-linux-gnu).  Standard library only: the containers import it too.

Each of K containers holds one anonymous mapping of ``TOTAL_BYTES // K`` (rounded down to two
pages).  Its first half holds the *shared* files, the same in every container (the layers of one
image); its second half holds files no other container has.  Files come from `select_files` in
its order: the shared half takes the first ones, then container 0's own half the next ones,
container 1's the ones after, and so on.  Each file starts on a page boundary (a file's last page
is padded with zeros, as in the mapping); the last file of a half is cut at the half's end and its
rest is not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

PAGE = 4096
LIB_DIR = Path("/usr/lib/x86_64-linux-gnu")
TOTAL_BYTES = 480 << 20  # over all containers: K = 3 holds 160 MiB each


@dataclasses.dataclass(frozen=True)
class Segment:
    """``length`` bytes from the start of ``path``, placed at a page boundary of a mapping."""

    path: str
    length: int

    @property
    def span(self) -> int:
        """Bytes of the mapping it takes: its length rounded up to whole pages."""
        return -(-self.length // PAGE) * PAGE


def select_files(root: Path = LIB_DIR) -> list[tuple[str, int]]:
    """(path, size) of the regular, readable, non-empty files under ``root``, sorted by path,
    each inode once (its first path in that order): Mesa's DRI drivers, for one, are a dozen hard
    links of one file.  Symbolic links and special files are skipped."""
    found: list[tuple[str, os.stat_result]] = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_size > 0 and os.access(path, os.R_OK):
                found.append((path, info))
    found.sort(key=lambda item: item[0])
    seen: set[tuple[int, int]] = set()
    files: list[tuple[str, int]] = []
    for path, info in found:
        inode = (info.st_dev, info.st_ino)
        if inode not in seen:
            seen.add(inode)
            files.append((path, info.st_size))
    return files


def container_bytes(containers: int) -> int:
    """The size of one container's mapping: two page-aligned halves."""
    return TOTAL_BYTES // containers // (2 * PAGE) * (2 * PAGE)


def layout(files: list[tuple[str, int]], containers: int) -> list[list[Segment]]:
    """The segments of each container's mapping, in mapping order (see the module docstring)."""
    half = container_bytes(containers) // 2
    remaining = iter(files)

    def fill() -> list[Segment]:
        segments: list[Segment] = []
        free = half
        while free > 0:
            try:
                path, size = next(remaining)
            except StopIteration:
                raise SystemExit(f"{LIB_DIR} holds too few files for the workload") from None
            segment = Segment(path, min(size, free))
            segments.append(segment)
            free -= segment.span  # free and spans are whole pages
        return segments

    shared = fill()
    return [shared + fill() for _ in range(containers)]


def digest(containers: list[list[Segment]]) -> str:
    """A short fingerprint of a layout: the host checks the guest filled the same one."""
    text = json.dumps([[(s.path, s.length) for s in c] for c in containers])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(segments: list[Segment], path: Path) -> None:
    path.write_text(json.dumps([(s.path, s.length) for s in segments]))


def load(path: Path) -> list[Segment]:
    return [Segment(p, n) for p, n in json.loads(path.read_text())]


def pages_of(segments: Iterable[Segment]) -> Iterator[bytes]:
    """Every page of a mapping filled with ``segments``, zero padding included."""
    for segment in segments:
        with open(segment.path, "rb") as file:
            data = file.read(segment.length)
        if len(data) != segment.length:
            raise SystemExit(f"{segment.path}: read {len(data)} of {segment.length} bytes")
        data += bytes(segment.span - len(data))
        view = memoryview(data)
        for offset in range(0, len(data), PAGE):
            yield view[offset : offset + PAGE].tobytes()


@dataclasses.dataclass(frozen=True)
class Floor:
    """How many of the workload's pages any store must keep: distinct, non-zero contents."""

    pages: int  # all pages of all containers
    zero_pages: int
    distinct_pages: int  # distinct contents among the non-zero pages

    @property
    def share(self) -> float:
        return self.distinct_pages / self.pages


def floor(containers: list[list[Segment]]) -> Floor:
    """Hash every page of every container (the shared half counted once per container)."""
    zero = bytes(PAGE)
    seen: set[bytes] = set()
    pages = zero_pages = 0
    for segments in containers:
        for page in pages_of(segments):
            pages += 1
            if page == zero:
                zero_pages += 1
            else:
                seen.add(hashlib.blake2b(page, digest_size=16).digest())
    return Floor(pages=pages, zero_pages=zero_pages, distinct_pages=len(seen))
