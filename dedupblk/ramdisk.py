"""A `BlockDevice` in a bytearray: a range check, then one copy, nothing else.

The ceiling the benchmarks measure a Python frontend against (bench/minimal_ublk.py serves it as
``/dev/ublkbN``), and a second device for the conformance suite's own tests.
"""

from __future__ import annotations

from .device import Extent
from .errors import InvalidRequest


class RamDisk:
    """``size`` bytes of memory, all zeros at first; nothing survives the process."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise InvalidRequest(f"bad size {size}: must be positive")
        self._size = size
        self._view = memoryview(bytearray(size))

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidRequest(f"{length} bytes at {offset} are outside {self._size} bytes")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self._view[offset : offset + length])

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._check(offset, len(data))
        self._view[offset : offset + len(data)] = data

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length)
        self._view[offset : offset + length] = bytes(length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        return [(offset, length, False)]

    def commit(self) -> None:
        pass

    def flush(self) -> None:
        pass
