"""The ceiling for a Python ublk server: dedupblk's ublk frontend over a RAM disk that only copies.

    python bench/minimal_ublk.py SIZE      (root, with ublk_drv loaded; prints /dev/ublkbN)

bench/ublk_guest.py serves this beside dedupblk and zram: whatever dedupblk costs above it is
hashing, the store's bookkeeping and LMDB, not the io_uring/ublk glue, which is the same code
(`dedupblk.frontends.ublk.serve_block_store` runs the queues exactly as ``dedupblk serve`` does,
one pass and one io_uring_enter for every batch of requests).  The bench/minimal_plugin.py of
the ublk benchmark.  Stops on SIGTERM or SIGINT like ``dedupblk serve``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dedupblk.frontends.ublk import serve_block_store  # noqa: E402 -- after the path
from dedupblk.store import InvalidRequest, parse_size  # noqa: E402


class RamDisk:
    """A `BlockStore` in a bytearray: a range check, then one copy, nothing else."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.disk = bytearray(size)
        self.view = memoryview(self.disk)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequest(f"{length} bytes at {offset} are outside {self.size} bytes")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.view[offset : offset + length])

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._check(offset, len(data))
        self.view[offset : offset + len(data)] = data

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length)
        self.view[offset : offset + length] = bytes(length)

    def commit(self) -> None:
        pass

    def flush(self) -> None:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="minimal_ublk: %(message)s")
    return serve_block_store(RamDisk(parse_size(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
