"""The registry of served stores: what ``dedupblk list`` shows and ``dedupblk stop`` stops.

Every ``dedupblk serve`` (either frontend) that has begun to serve writes one record, a small
JSON `Served`, and removes it when it stops. A background nbdkit has no ``serve`` left to remove
its record, and a server killed by SIGKILL cannot: whoever reads the registry removes the
records of processes that are gone.

Where. Root's registry is /run/dedupblk-served: one place for every root process whatever its
XDG_RUNTIME_DIR (a systemd service has none, a login shell /run/user/0). Not under /run/dedupblk:
the swap unit (and the README) mount the swap store's ramfs there, which would hide every record
written before it. Any other user's is ``served/`` in that user's runtime directory (the one
`user_runtime_dir` makes, where the NBD launcher keeps its sockets and pid files): each user
lists and stops their own servers.

A record's name is the hash of the store's real path, the server's pid and its start time: one
name per server process, never reused. So a serve that fails, which has written none, cannot
replace or remove a running server's record; two read-only servers of one store have one each;
and a new process with a recycled pid writes another file. Each is written under a temporary
name (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) and renamed into place, so a reader sees a
whole record or none, in a directory of mode 0700 that this user owns, where no other user can
put anything.

A server is its pid and its start time (/proc/PID/stat): a record whose pid now belongs to
another process counts as gone, so ``stop`` never signals a stranger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import ServedError

log = logging.getLogger(__name__)

ROOT_REGISTRY: Final = Path("/run/dedupblk-served")
RUNTIME_DIR_ENV: Final = "DEDUPBLK_RUNTIME_DIR"  # one directory for all of it (tests)
STOP_POLL_SECONDS: Final = 0.05
# How long `dedupblk stop` waits by default: a ublk server with swap swapoffs first, which reads
# back every swapped page; an NBD server closes its store (a commit and a flush).
STOP_TIMEOUT_SECONDS: Final = 60.0


@dataclass(frozen=True)
class Served:
    """One server, as its record says: the store (a real path), the frontend (``nbd`` or
    ``ublk``), the process to signal and its start time, and where clients find it."""

    store: str
    frontend: str
    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22)
    socket: str | None = None  # nbd: the Unix socket
    uri: str | None = None  # nbd: what clients connect to
    device: str | None = None  # ublk: /dev/ublkbN

    @property
    def endpoint(self) -> str:
        """Where it serves: the socket, else the URI (TCP), else the device."""
        return self.socket or self.uri or self.device or "-"

    def running(self) -> bool:
        """Whether the process that wrote this record still runs (not a recycled pid)."""
        return process_start_time(self.pid) == self.start_time


def user_runtime_dir() -> Path:
    """A private (0700) per-user directory for sockets, pid files and the registry:
    ``$XDG_RUNTIME_DIR/dedupblk``, else ``$TMPDIR/dedupblk-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base):
        return private_directory(Path(tempfile.gettempdir()) / f"dedupblk-{os.getuid()}")
    return private_directory(Path(base) / "dedupblk")


def private_directory(directory: Path) -> Path:
    """``directory``, made with mode 0700 if missing; refused unless it is a directory (not a
    symlink) that this user owns and no one else may enter."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = directory.lstat()  # a symlink planted in its place is refused, never followed
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ServedError(f"{directory} is not a private directory owned by this user")
    return directory


def registry_dir() -> Path:
    """Where this user's servers keep their records (see the module docstring), and their
    counters files (`dedupblk.runtime`); ``$DEDUPBLK_RUNTIME_DIR`` instead if set."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return private_directory(Path(explicit))
    if os.geteuid() == 0:
        return private_directory(ROOT_REGISTRY)
    return private_directory(user_runtime_dir() / "served")


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid``, or None if there is none (or only its zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it serves nothing
        return None
    return int(fields[19])


def register(
    store: str,
    frontend: str,
    *,
    pid: int | None = None,
    socket: str | None = None,
    uri: str | None = None,
    device: str | None = None,
) -> Path | None:
    """Write the record of the server ``pid`` (this process by default) serving ``store``;
    its path, for `unregister`. None if that process is already gone or the record cannot be
    written: that is logged, and the server goes on serving (only ``list`` and ``stop`` miss it).
    """
    pid = os.getpid() if pid is None else pid
    start_time = process_start_time(pid)
    if start_time is None:
        return None
    record = Served(
        store=os.path.realpath(store), frontend=frontend, pid=pid, start_time=start_time,
        socket=socket, uri=uri, device=device,
    )  # fmt: skip
    try:
        directory = registry_dir()
        name = f"{_digest(record.store)}-{pid}-{start_time}.json"
        temporary = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(dataclasses.asdict(record), out)
            os.rename(temporary, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except (OSError, ServedError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        log.warning("not registered for `dedupblk list` and `stop`: %s", reason)
        return None
    return directory / name


def unregister(path: Path | None) -> None:
    """Remove a record `register` wrote (nothing if it wrote none or it is gone already)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def entries(store: str | None = None) -> list[tuple[Path, Served]]:
    """The records of servers that still run (of ``store`` only, if given), by store; the
    records of gone ones, and any that cannot be read, are removed."""
    wanted = None if store is None else os.path.realpath(store)
    found: list[tuple[Path, Served]] = []
    for path in sorted(registry_dir().glob("*.json")):
        record = _read(path)
        if record is None or not record.running():
            unregister(path)
            continue
        if wanted is None or record.store == wanted:
            found.append((path, record))
    found.sort(key=lambda entry: (entry[1].store, entry[1].pid))
    return found


def stop(store: str, *, timeout: float = STOP_TIMEOUT_SECONDS) -> list[Served]:
    """SIGTERM every server of ``store`` and wait until each has exited; the records stopped.

    Raises `ServedError` if no server serves ``store``, or if one still runs after ``timeout``
    seconds (it was signalled; it may still stop later).
    """
    found = entries(store)
    if not found:
        raise ServedError(f"no server serves {store} (see dedupblk list)")
    for _, record in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for path, record in found:
        while record.running():
            if time.monotonic() > deadline:
                raise ServedError(
                    f"{record.frontend} server pid {record.pid} of {record.store} still runs "
                    f"{timeout:g} s after SIGTERM" + _STOP_HINTS[record.frontend]
                )
            time.sleep(STOP_POLL_SECONDS)
        unregister(path)  # a background nbdkit's: nobody else removes it
    return [record for _, record in found]


_STOP_HINTS: Final = {
    # A background nbdkit waits for connected clients to send a request or leave (nbdkit 1.32
    # has no timeout); a foreground serve ends them itself.
    "nbd": " (a background nbdkit waits for its idle clients to disconnect)",
    "ublk": " (swapoff may still be reading swapped pages back)",
}


def _read(path: Path) -> Served | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as source:
            data = json.load(source)
        names = {field.name for field in dataclasses.fields(Served)}
        return Served(**{key: value for key, value in data.items() if key in names})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _digest(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:16]
