"""Metadata per page: LMDB's high-water mark over the mapped pages, after a fill and after full
overwrites, through the public API (the measurement of issue 11, a script that prints).

    .venv/bin/python bench/meta_bench.py [--pages 65536] [--overwrites 5] [--duplicates 0,50]

A store of PAGES pages is filled in random order (DUP% of the pages repeat one of the earlier
contents, the rest are unique), flushed, then overwritten in full OVERWRITES times with new
contents of the same mix, each pass flushed. After each pass it prints LMDB's high-water mark,
``(last_pgno + 1) * psize``, divided by the mapped pages (pages stored in slots), beside the
pages in use inside it. Not a test: tests/unit/test_meta_size.py asserts the bounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.meta_size import passes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=65536)
    parser.add_argument("--overwrites", type=int, default=5)
    parser.add_argument("--duplicates", default="0,50")
    args = parser.parse_args(argv)
    print(f"{args.pages} pages, random order; bytes of LMDB high-water mark per mapped page")
    print(f"{'dup %':>5} {'pass':>10} {'mapped':>8} {'stored':>8} {'B/page':>8}")
    for percent in (int(p) for p in args.duplicates.split(",")):
        for n, stats, used in passes(args.pages, percent, args.overwrites):
            label = "fill" if n == 0 else f"overwrite {n}"
            print(f"{percent:>5} {label:>10} {stats.mapped_pages:>8} {stats.stored_pages:>8} "
                  f"{used / stats.mapped_pages:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
