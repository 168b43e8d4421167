"""The block-device contract between a device and the frontends that serve it.

`Store` fulfils it, and so do the RAM disk (`dedupblk.ramdisk`, the benchmarks' ceiling) and the
conformance suite's adapters (tests/conformance.py), so the ublk queue, the nbdkit adapter and the
suite are written once against `BlockDevice`. Offsets and lengths are bytes; a request outside
``[0, size)`` raises `dedupblk.errors.InvalidRequest`; a device never returns data that was not
written at that offset (unwritten bytes read as zeros).
"""

from __future__ import annotations

from typing import Protocol

Extent = tuple[int, int, bool]  # offset, length, is_hole (a hole reads as zeros)


class BlockDevice(Protocol):
    """What a frontend asks of the device it serves."""

    @property
    def size(self) -> int:
        """Bytes of the device."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """The device's bytes ``[offset, offset + length)``."""
        ...

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable before returning)."""
        ...

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range: it reads back as zeros (a partial page on a full device may keep its
        bytes: a discard never fails for lack of space)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zero a range."""
        ...

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Contiguous runs covering the range, each data or hole."""
        ...

    def commit(self) -> None:
        """Make what was accepted survive a crash of this process (not of the machine)."""
        ...

    def flush(self) -> None:
        """Make everything accepted so far durable."""
        ...
