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
from dedupblk.ramdisk import RamDisk  # noqa: E402
from dedupblk.sizes import parse_size  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="minimal_ublk: %(message)s")
    return serve_block_store(RamDisk(parse_size(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
