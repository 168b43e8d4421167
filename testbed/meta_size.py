"""The metadata-per-page workload of issue 11, shared by bench/meta_bench.py (which prints it) and
tests/unit/test_meta_size.py (which bounds it)."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator

from dedupblk.store import Statistics, create_store, open_store

P = 4096
REMEMBERED = 4096  # earlier contents a duplicate may repeat


def passes(
    pages: int,
    duplicate_percent: int,
    overwrites: int,
    *,
    seed: int = 1,
    directory: str = "/var/tmp",
) -> Iterator[tuple[int, Statistics, int]]:
    """Fill a store of ``pages`` pages in random order (``duplicate_percent`` of the writes
    repeat an earlier content, the rest are unique), flush, then overwrite it in full
    ``overwrites`` times with the same mix, each pass flushed. Yield (pass, statistics, LMDB's
    high-water mark in bytes) after the fill and after each overwrite."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="meta-size-", dir=directory) as tmp:
        path = os.path.join(tmp, "store")
        create_store(path, pages * P)
        with open_store(path) as store:
            written: list[bytes] = []
            for n in range(overwrites + 1):
                order = list(range(pages))
                rng.shuffle(order)
                for page in order:
                    if written and rng.randrange(100) < duplicate_percent:
                        content = rng.choice(written)
                    else:
                        content = rng.randbytes(P)
                        if len(written) < REMEMBERED:
                            written.append(content)
                    store.write(page * P, content)
                store.flush()
                yield n, store.statistics(), store.statistics().metadata_bytes
