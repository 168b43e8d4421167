"""The main job (``make demo``): create a store, write a swap-like workload into it, print stats.

The workload imitates what swap sees: pages of a few program images repeated many times, zero
pages, same-filled pages and unique pages, written in random order with overwrites and discards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict

from .store import PAGE_SIZE, check_store, create_store, open_store

DEMO_DIR = "/var/tmp/dedupblk-demo"


def swap_like_pages(count: int, rng: random.Random) -> list[bytes]:
    images = [rng.randbytes(PAGE_SIZE) for _ in range(256)]  # shared library and heap pages
    out = []
    for _ in range(count):
        kind = rng.randrange(100)
        if kind < 45:
            out.append(rng.choice(images))
        elif kind < 65:
            out.append(bytes(PAGE_SIZE))
        elif kind < 75:
            out.append(bytes([rng.randrange(1, 256)]) * PAGE_SIZE)
        else:
            out.append(rng.randbytes(PAGE_SIZE))
    return out


def main() -> int:
    store_dir = os.environ.get("DEDUPBLK_DEMO_STORE", DEMO_DIR)
    shutil.rmtree(store_dir, ignore_errors=True)
    pages = 16384  # a 64 MiB device
    create_store(store_dir, pages * PAGE_SIZE)
    rng = random.Random(2026)
    contents = swap_like_pages(pages, rng)
    with open_store(store_dir) as store:
        for page in rng.sample(range(pages), pages):
            store.write(page * PAGE_SIZE, contents[page])
        for _ in range(64):  # swap frees slots: discard a few ranges
            start = rng.randrange(pages - 16)
            store.trim(start * PAGE_SIZE, 16 * PAGE_SIZE)
        store.flush()
        stats = store.statistics()
    result = check_store(store_dir)
    print(f"store {store_dir}: {pages} pages written, check "
          f"{'clean' if not result.problems else 'FAILED'}")
    print(json.dumps(asdict(stats), indent=2))
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
