"""Format v2's metadata per page: LMDB's high-water mark ``(last_pgno + 1) * psize`` over the
mapped pages of a 65,536-page device filled in random order and overwritten in full five times
through the public API (bench/meta_bench.py prints the same figures). The store is on tmpfs:
LMDB lays its pages out the same in a volatile store (only the syncs differ), and no test waits
for a disk."""

from __future__ import annotations

import pytest

from testbed.meta_size import passes

PAGES = 65536


@pytest.mark.parametrize(("duplicate_percent", "bound"), [(50, 48), (0, 64)])
def test_metadata_per_mapped_page(duplicate_percent: int, bound: int) -> None:
    for n, stats, used in passes(PAGES, duplicate_percent, overwrites=5, directory="/dev/shm"):
        per_page = used / stats.mapped_pages
        assert per_page <= bound, f"pass {n}: {per_page:.1f} bytes a page, bound {bound}"
