"""Python bytecodes the store runs per page written or read, counted, not timed.

    .venv/bin/python bench/python_steps.py [--pages 4096] [--top 6]
    PYTHONPATH=OTHER_CHECKOUT .venv/bin/python bench/python_steps.py   # another checkout's store

Each workload writes ``--pages`` pages into a fresh volatile store in /dev/shm and flushes (4 KiB
writes at random pages with 0, 50 or 90% duplicates, as `dedupblk bench`; or 1 MiB sequential
writes), then reads as many random pages; a trace function counts every bytecode the store
executes (``f_trace_opcodes``). The counts are the same from run to run, which timings on these
machines are not, so two checkouts compare exactly; they leave out C (LMDB, hashing, copies) and
the kernel. Group commit's timer is switched off so that commits fall where the buffer fills, not
where the (traced, slow) clock says. Prints bytecodes per page, and where most of them run.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dedupblk.store.store as store_module
from dedupblk.store import PAGE_SIZE, create_store, open_store

HOT_CONTENTS = 64  # as dedupblk.bench
MIB = 1 << 20


def _requests(workload: str, pages: int, rng: random.Random) -> list[tuple[int, bytes]]:
    kind, _, percent = workload.partition("-")
    duplicates = int(percent or 0)
    hot = [rng.randbytes(PAGE_SIZE) for _ in range(HOT_CONTENTS)]
    contents = [
        rng.choice(hot) if rng.randrange(100) < duplicates else rng.randbytes(PAGE_SIZE)
        for _ in range(pages)
    ]
    if kind == "rand":
        return [(rng.randrange(pages) * PAGE_SIZE, page) for page in contents]
    data = b"".join(contents)
    return [(at, data[at : at + MIB]) for at in range(0, len(data), MIB)]


def _counted(body: Callable[[], None]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        if event == "opcode" and code.co_filename != __file__:  # the store's, not this loop's
            counts[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
        return trace

    sys.settrace(trace)
    try:
        body()
    finally:
        sys.settrace(None)
    return counts


def measure(workload: str, pages: int) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Bytecodes of the writes (and their flush) and of as many random page reads."""
    rng = random.Random(0)
    requests = _requests(workload, pages, rng)
    reads = [rng.randrange(pages) * PAGE_SIZE for _ in range(pages)]
    scratch = tempfile.mkdtemp(dir="/dev/shm")
    try:
        path = os.path.join(scratch, "store")
        create_store(path, pages * PAGE_SIZE)
        with open_store(path) as store:

            def write() -> None:
                for offset, data in requests:
                    store.write(offset, data)
                store.flush()

            def read() -> None:
                for offset in reads:
                    store.read(offset, PAGE_SIZE)

            return _counted(write), _counted(read)
    finally:
        shutil.rmtree(scratch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--top", type=int, default=6, help="functions shown for each row")
    args = parser.parse_args()
    store_module.GROUP_SECONDS = 1e9  # see the module docstring
    print(f"store: {os.path.dirname(store_module.__file__)}, {args.pages} pages a workload")
    print(f"{'workload':<10} {'op':<6} {'bytecodes/page':>15}  where")
    for workload in ("rand-0", "rand-50", "rand-90", "seq-0", "seq-50"):
        writes, reads = measure(workload, args.pages)
        rows = [("write", writes)] + ([("read", reads)] if workload.startswith("rand") else [])
        for op, counts in rows:
            where = ", ".join(
                f"{name} {n / args.pages:.0f}" for name, n in counts.most_common(args.top)
            )
            print(f"{workload:<10} {op:<6} {sum(counts.values()) / args.pages:>15.0f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
