"""In-process store benchmark: 4 KiB page writes/s and reads/s at 0%, 50% and 90% duplicates.

``python -m dedupblk.bench [--pages N] [--rounds R] [--dir DIR]`` (or ``dedupblk bench``) prints a
table. Each workload writes ``N`` random pages (uniform over a device of ``N`` pages) with group
commit and a final flush, then reads ``N`` random pages. Page contents are made before timing:
a duplicate page repeats one of 64 hot contents, every other page is unique. Figures are medians
over the rounds; compare them only with figures from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DedupblkError, InvalidRequest
from .store import PAGE_SIZE, create_store, open_store

HOT_CONTENTS = 64
DEFAULT_PAGES = 32768
DEFAULT_ROUNDS = 3
DIR_ENV = "DEDUPBLK_BENCH_DIR"
DEFAULT_DIR = "/var/tmp"


@dataclass(frozen=True)
class Result:
    duplicates: int  # percent
    writes_per_s: float
    reads_per_s: float
    dedup_ratio: float | None
    stored_pages: int


def _contents(pages: int, duplicate_percent: int, rng: random.Random) -> list[bytes]:
    hot = [rng.randbytes(PAGE_SIZE) for _ in range(HOT_CONTENTS)]
    return [
        rng.choice(hot) if rng.randrange(100) < duplicate_percent else rng.randbytes(PAGE_SIZE)
        for _ in range(pages)
    ]


def run_one(directory: str, pages: int, duplicate_percent: int, seed: int) -> Result:
    rng = random.Random(seed)
    contents = _contents(pages, duplicate_percent, rng)
    targets = [rng.randrange(pages) * PAGE_SIZE for _ in range(pages)]
    reads = [rng.randrange(pages) * PAGE_SIZE for _ in range(pages)]
    path = os.path.join(directory, f"bench-{duplicate_percent}-{seed}")
    create_store(path, pages * PAGE_SIZE)
    with open_store(path) as store:
        write = store.write
        start = time.perf_counter()
        for offset, data in zip(targets, contents, strict=True):
            write(offset, data)
        store.flush()
        write_s = time.perf_counter() - start
        read = store.read
        start = time.perf_counter()
        for offset in reads:
            read(offset, PAGE_SIZE)
        read_s = time.perf_counter() - start
        stats = store.statistics()
    return Result(
        duplicate_percent, pages / write_s, pages / read_s, stats.dedup_ratio, stats.stored_pages
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES, help="pages per workload")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds (median)")
    parser.add_argument("--dir", default=None, help="where to make the stores (not tmpfs)")
    args = parser.parse_args(argv)
    return run(pages=args.pages, rounds=args.rounds, directory=args.dir)


def run(*, pages: int, rounds: int, directory: str | None) -> int:
    """Print the table (``directory`` None: ``$DEDUPBLK_BENCH_DIR``, else /var/tmp); a bad value
    is `InvalidRequest` (``dedupblk bench`` and ``python -m dedupblk.bench`` show one line)."""
    import statistics  # noqa: PLC0415  (the CLI imports this module; a server need not load it)

    for name, value in (("pages", pages), ("rounds", rounds)):
        if value < 1:
            raise InvalidRequest(f"--{name} {value}: must be at least 1")
    base = directory or os.environ.get(DIR_ENV) or DEFAULT_DIR
    try:
        workspace = tempfile.TemporaryDirectory(prefix="dedupblk-bench-", dir=base)
    except OSError as exc:
        raise InvalidRequest(f"cannot make a directory in {base}: {exc.strerror}") from None
    with workspace as scratch:
        print(
            f"in-process store, {pages} random 4 KiB pages per run, "
            f"median of {rounds} rounds, stores under {base}"
        )
        print(
            f"{'duplicates':>10} {'writes/s':>12} {'reads/s':>12} {'dedup ratio':>12} "
            f"{'stored pages':>13}"
        )
        for percent in (0, 50, 90):
            results = [run_one(scratch, pages, percent, seed) for seed in range(rounds)]
            print(
                f"{percent:>9}% {statistics.median(r.writes_per_s for r in results):>12,.0f} "
                f"{statistics.median(r.reads_per_s for r in results):>12,.0f} "
                f"{statistics.median(r.dedup_ratio or 1.0 for r in results):>12.2f} "
                f"{statistics.median(r.stored_pages for r in results):>13,.0f}"
            )
    return 0


def _main() -> int:
    """`main` as a program (``python -m dedupblk.bench``): a deliberate error is one line."""
    try:
        return main()
    except DedupblkError as exc:
        print(f"dedupblk bench: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(_main())
