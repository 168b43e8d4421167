"""Where a store's write time goes: the batch's CPU work, the slot writes, the syncs, the wait.

    .venv/bin/python bench/commit_time.py [--pages 32768] [--dir /var/tmp] [--duplicates 0]

Writes ``--pages`` random 4 KiB pages (`dedupblk bench`'s 0/50/90% workload) into a fresh store
under ``--dir`` (/var/tmp: a durable store; /dev/shm: a volatile one) and flushes, with a timer
around each stage of a commit: the batch applied in its transaction (`Batch.apply`, holding the
GIL, slot writes included), the slot writes alone (`Backend.write_slots`), the slot data's sync
before the commit (`Backend.sync`), LMDB's own sync at a flush (`Meta.sync`), and how long the
writing thread waited for the committer thread (`Store._wait_for_committer`). Prints seconds and
calls of each, the pages written per second, and the CPU time the process took meanwhile (user
and system, all threads: about the wall time means the work ran about one thread at a time).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupblk.store import PAGE_SIZE, create_store, open_store
from dedupblk.store.backend import Backend
from dedupblk.store.batch import Batch
from dedupblk.store.meta import Meta
from dedupblk.store.store import Store

STAGES = (
    ("batch applied", Batch, "apply"),
    ("  of it, slot writes", Backend, "write_slots"),
    ("slot data synced", Backend, "sync"),
    ("LMDB synced (flush)", Meta, "sync"),
    ("writer waited", Store, "_wait_for_committer"),
)


def _timed(seconds: collections.Counter[str], calls: collections.Counter[str]) -> None:
    for label, owner, name in STAGES:
        method = getattr(owner, name)

        @functools.wraps(method)
        def timed(*args: Any, _method: Any = method, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - start
                calls[_label] += 1

        setattr(owner, name, timed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=32768)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--duplicates", type=int, default=0, help="percent")
    args = parser.parse_args()
    rng = random.Random(0)
    hot = [rng.randbytes(PAGE_SIZE) for _ in range(64)]
    contents = [
        rng.choice(hot) if rng.randrange(100) < args.duplicates else rng.randbytes(PAGE_SIZE)
        for _ in range(args.pages)
    ]
    offsets = [rng.randrange(args.pages) * PAGE_SIZE for _ in range(args.pages)]
    seconds: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    _timed(seconds, calls)
    scratch = tempfile.mkdtemp(dir=args.dir)
    try:
        path = os.path.join(scratch, "store")
        create_store(path, args.pages * PAGE_SIZE)
        with open_store(path) as store:
            kind = "volatile" if store.volatile is not None else "durable"
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            for offset, page in zip(offsets, contents, strict=True):
                store.write(offset, page)
            store.flush()
            total = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        shutil.rmtree(scratch)
    print(f"{kind} store under {args.dir}, {args.pages} pages, {args.duplicates}% duplicates: "
          f"{args.pages / total:,.0f} pages/s, {total:.2f} s")  # fmt: skip
    print(f"the process's CPU meanwhile, all threads: user {after.ru_utime - before.ru_utime:.2f} "
          f"s, system {after.ru_stime - before.ru_stime:.2f} s")  # fmt: skip
    print(f"{'stage':<24} {'seconds':>8} {'calls':>6}")
    for label, _, _ in STAGES:
        print(f"{label:<24} {seconds[label]:>8.3f} {calls[label]:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
