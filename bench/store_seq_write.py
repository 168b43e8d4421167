"""The store alone, 1 MiB sequential writes of unique data (seq-write.fio's shape), in-process.

    .venv/bin/python bench/store_seq_write.py [--size 256M] [--rounds 2]

The ceiling for seq-write over NBD with no transport at all: a fresh store written in 1 MiB
writes and flushed, on /var/tmp (a durable store) and in /dev/shm (volatile), beside a copy of
the same bytes into a bytearray (all bench/minimal_plugin.py does per write). Prints MiB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupblk.sizes import parse_size
from dedupblk.store import create_store, open_store

CHUNK = 1 << 20


def store_mib_s(where: str, chunks: list[bytes]) -> float:
    scratch = tempfile.mkdtemp(dir=where)
    try:
        path = os.path.join(scratch, "store")
        create_store(path, len(chunks) * CHUNK)
        with open_store(path) as store:
            start = time.perf_counter()
            for n, chunk in enumerate(chunks):
                store.write(n * CHUNK, chunk)
            store.flush()
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch)
    return len(chunks) * CHUNK / seconds / (1 << 20)


def copy_mib_s(chunks: list[bytes]) -> float:
    disk = bytearray(len(chunks) * CHUNK)
    start = time.perf_counter()
    for n, chunk in enumerate(chunks):
        disk[n * CHUNK : (n + 1) * CHUNK] = chunk
    return len(chunks) * CHUNK / (time.perf_counter() - start) / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    chunks = [os.urandom(CHUNK) for _ in range(max(1, parse_size(args.size) // CHUNK))]
    print(f"{'round':>5} {'durable MiB/s':>14} {'volatile MiB/s':>15} {'bytearray MiB/s':>16}")
    for n in range(args.rounds):
        durable, volatile = store_mib_s("/var/tmp", chunks), store_mib_s("/dev/shm", chunks)
        print(f"{n + 1:>5} {durable:14.1f} {volatile:15.1f} {copy_mib_s(chunks):16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
