"""SIGKILL at random moments: the store opens, every check passes, every page flushed before the
kill reads back exactly, and every page written after the last flush reads back as its flushed
content or one of the contents written since, never anything else."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from dedupblk.store import check_store, create_store, open_store
from tests.conftest import REPO

P = 4096
PAGES = 64
KILLS = 24

# The child writes forever. Before each request it appends an intent line to the log (the log
# is in the page cache, which a SIGKILL does not lose); after each flush it appends "F".
CHILD = r"""
import os, random, sys
from dedupblk.store import open_store
from tests.unit.test_crash import content, PAGES, P
path, log_path, generation = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
with open_store(path) as store:
    os.write(log, b"R\n")
    while True:
        generation += 1
        rng = random.Random(generation)
        for _ in range(rng.randrange(1, 40)):
            page, count = rng.randrange(PAGES), rng.randrange(1, 4)
            count = min(count, PAGES - page)
            trim = rng.random() < 0.1
            os.write(log, f"W {generation} {page} {count} {int(trim)}\n".encode())
            if trim:
                store.trim(page * P, count * P)
            else:
                pages = range(page, page + count)
                store.write(page * P, b"".join(content(generation, p) for p in pages))
        if rng.random() < 0.5:
            store.flush()
            os.write(log, f"F {generation}\n".encode())
"""


def content(generation: int, page: int) -> bytes:
    """What generation ``generation`` writes to ``page``: zero, same-filled, shared or unique."""
    kind = (generation * 31 + page) % 7
    if kind == 0:
        return bytes(P)
    if kind == 1:
        return bytes([(generation + page) % 255 + 1]) * P
    if kind in (2, 3):
        return random.Random(kind * 1000 + generation % 3).randbytes(P)
    return random.Random(generation * 100003 + page).randbytes(P)


def allowed_contents(log_text: str, base: bytes) -> dict[int, set[bytes]]:
    """Per page, every content it may hold now: its content at the last flush (``base`` before
    any flush of this round) and every content written after that flush."""
    current = {p: base[p * P : (p + 1) * P] for p in range(PAGES)}
    flushed = dict(current)
    since: dict[int, set[bytes]] = {}
    for line in log_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "F":
            flushed = dict(current)
            since = {}
        if len(fields) != 5 or fields[0] != "W":
            continue  # the start marker, or a line cut short by the kill (never started)
        generation, page, count, trim = map(int, fields[1:])
        for p in range(page, page + count):
            new = bytes(P) if trim else content(generation, p)
            current[p] = new
            since.setdefault(p, set()).add(new)
    return {p: {flushed[p]} | since.get(p, set()) for p in range(PAGES)}


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    log_path = tmp_path / "log"
    create_store(path, PAGES * P, backend_size=(PAGES + 9) * P)
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = bytes(PAGES * P)
    changed = 0
    for kill in range(KILLS):
        log_path.write_bytes(b"")
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(log_path), str(kill * 100000)], env=env
        )
        started = time.monotonic()
        while not log_path.read_bytes().startswith(b"R\n") and time.monotonic() - started < 60:
            assert child.poll() is None, "the writer died before the kill"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        allowed = allowed_contents(log_path.read_text(), base)
        assert check_store(path).problems == [], f"after kill {kill}"
        with open_store(path) as store:
            state = store.read(0, PAGES * P)
            store.flush()
        for page in range(PAGES):
            got = state[page * P : (page + 1) * P]
            assert got in allowed[page], f"kill {kill}: page {page} holds other data"
        changed += state != base
        base = state
    assert changed >= KILLS // 2  # the kills landed while data was being written
