"""What a serving process leaves for ``dedupblk stats`` in another process: its counters file.

A server (the nbdkit plugin or the ublk frontend) counts its requests in memory
(`dedupblk.counters.ServerCounters`). Every `SNAPSHOT_SECONDS`, when they changed, and once more
when it stops, it writes them as a small JSON record to ``<runtime dir>/<store name>-<hash of
the store's real path>.counters``; `read_counters` gives that record back only while the process
that wrote it is alive (its pid, and its start time so that a reused pid does not count). The
file is a convenience: a server that cannot write it logs why once and serves on.

The file is kept beside the server's record in the registry of served stores
(`dedupblk.served.registry_dir`: private to this user, mode 0700; a symlink in its place is
refused, never followed). A `stats` run by another user than the server's finds no counters. Files
are written to a new name (``O_EXCL | O_NOFOLLOW``, 0600) and renamed over the old one, so a
reader sees a whole record, and nothing is written through a link another user planted. The
server never reads the file back: even on a tmpfs that swaps to its own device, no request
waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .errors import ServedError
from .served import process_start_time, registry_dir

log = logging.getLogger(__name__)

SNAPSHOT_SECONDS: Final = 2.0
COUNTERS_SUFFIX: Final = ".counters"


def counters_path(store_path: str) -> Path:
    """Where the server of ``store_path`` keeps its counters (one file per store)."""
    real = os.path.realpath(store_path)
    name = (os.path.basename(real.rstrip("/")) or "store")[:32]
    digest = hashlib.sha256(real.encode()).hexdigest()[:12]
    return registry_dir() / f"{name}-{digest}{COUNTERS_SUFFIX}"


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` with ``record`` as JSON, atomically, mode 0600, through no symlink."""
    data = json.dumps(record, sort_keys=True).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # a leftover of a killed process that had our pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
    finally:
        os.close(fd)
    try:
        os.replace(temporary, path)  # replaces a symlink at `path` itself, never follows it
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def read_counters(store_path: str) -> dict[str, Any] | None:
    """The counters of the process serving ``store_path``, or None: no such file, one this user
    does not own, or one whose writer is gone."""
    try:
        path = counters_path(store_path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, ServedError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            record = json.loads(handle.read(1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(record, dict):
        return None
    pid, started = record.get("pid"), record.get("started")
    if not isinstance(pid, int) or process_start_time(pid) != started:
        return None
    return record


class CountersWriter:
    """A thread that writes ``snapshot()`` to the store's counters file every
    `SNAPSHOT_SECONDS` when it changed, and once more at `stop`."""

    def __init__(
        self,
        store_path: str,
        snapshot: Callable[[], dict[str, Any]],
        *,
        interval: float = SNAPSHOT_SECONDS,
    ) -> None:
        self._snapshot = snapshot
        self._interval = interval
        self._stopping = threading.Event()
        self._last: dict[str, Any] | None = None
        self._failed = False
        self._header: dict[str, Any] = {
            "pid": os.getpid(),
            "started": process_start_time(os.getpid()),
            "store": os.path.realpath(store_path),
        }
        try:
            self.path: Path | None = counters_path(store_path)
        except (OSError, ServedError) as exc:
            log.warning("no counters file for dedupblk stats: %s", exc)
            self.path = None
        self._thread = threading.Thread(target=self._run, name="dedupblk-counters", daemon=True)

    def start(self) -> None:
        if self.path is not None:
            self._thread.start()

    def stop(self) -> None:
        """Write the last counters and end the thread."""
        if self.path is None:
            return
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._write()

    def _write(self) -> None:
        assert self.path is not None
        counters = self._snapshot()
        if counters == self._last:
            return
        try:
            write_record(self.path, {**self._header, "updated": time.time(), **counters})
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write the counters file %s: %s", self.path, exc)
            self._failed = True
            return
        self._last = counters
