"""The nbdkit frontend's logic: nbdkit's Python-plugin callbacks translated into store calls.

`nbdkit_plugin.py` is the file nbdkit runs (as `__main__`, inside its embedded interpreter); it only
binds the callbacks of one `NbdkitPlugin` to the module-level names nbdkit looks up. Everything
else lives here so that it can be imported and tested outside nbdkit: the `nbdkit` module exists
only inside nbdkit, so the plugin hands it in as `host` (tests pass a fake).

Life cycle, in nbdkit's order (see nbdkit-plugin(3)):

- `config(key, value)` once per `key=value`: each value is parsed here, so a bad one is reported
  against its key.
- `config_complete()`: cross-parameter checks (a store is named; creation options need `size=`).
- `get_ready()`: runs in the foreground before nbdkit binds its socket or forks. Creates the store
  when `size=` is given and it is missing, then opens and closes it once, so that a missing,
  locked or mismatched store stops nbdkit with a one-line error before it serves anything.
- `after_fork()`: opens the store for serving. An LMDB environment must not cross a fork, and
  nbdkit forks into the background between `get_ready` and `after_fork`.
- request callbacks (`pread`, `pwrite`, ...), from nbdkit's worker threads. There is one store for
  all connections; it is thread-safe and a flush makes every connection's writes durable, which
  is why `can_multi_conn` is true.
- `cleanup()`: closes the store (flushing what is buffered and marking it clean) before nbdkit
  exits.

Errors are translated in one place, `NbdkitPlugin.failure`: a `StoreError` becomes its `.errno`,
anything else is a bug and becomes EIO with its traceback in nbdkit's error log. nbdkit then
answers that one request with the error and keeps serving.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, Final, ParamSpec, Protocol, TypeVar

from dedupblk.store import (
    PAGE_SIZE,
    NotAStore,
    Store,
    StoreError,
    StoreExists,
    create_store,
    open_store,
)

# Values fixed by nbdkit's plugin ABI (nbdkit-plugin.h); the `nbdkit` module exports the same.
FLAG_MAY_TRIM: Final = 1
FLAG_FUA: Final = 2
FLAG_REQ_ONE: Final = 4
FLAG_FAST_ZERO: Final = 8
FUA_NATIVE: Final = 2
THREAD_MODEL_SERIALIZE_ALL_REQUESTS: Final = 1
THREAD_MODEL_PARALLEL: Final = 3
EXTENT_DATA: Final = 0
EXTENT_HOLE_ZERO: Final = 3  # NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO

# Block sizes advertised to clients (nbdkit 1.32 advertises but does not enforce them, so the
# store still handles any byte range). The minimum is the page: smaller writes cost the client a
# read-modify-write, which qemu does and libnbd clients refuse to avoid. Preferred and maximum were
# measured with fio sequential writes of unique data over NBD (2 cores, iodepth 8): 64 KiB 163
# MB/s, 256 KiB 233, 1 MiB 240, 4 MiB 217, 16 MiB 236. Throughput is flat from 256 KiB on, and a
# larger request only holds the store's lock longer; 4 MiB is one group-commit batch
# (store.GROUP_PAGES pages), which bounds that hold.
MINIMUM_BLOCK_SIZE: Final = PAGE_SIZE
PREFERRED_BLOCK_SIZE: Final = 256 * 1024
MAXIMUM_BLOCK_SIZE: Final = 4 * 1024 * 1024

# An extents reply may cover only a prefix of the range asked for; clients ask again for the rest.
# Capping it bounds the time one `nbdinfo --map` call over a large device holds the store's lock.
MAXIMUM_EXTENTS_SPAN: Final = 1024 * 1024 * 1024

THREAD_MODELS: Final = {
    "parallel": THREAD_MODEL_PARALLEL,
    "serialize": THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
}
# Chosen by measurement (bench/nbd_bench.py and fio over one or two connections, 4 KiB random,
# iodepth 32, 2 cores). Python requests serialise on the GIL and the store's lock anyway; with
# PARALLEL and nbdkit's default 16 threads per connection they also hand both back and forth:
#   IOPS, one connection (medians of 3 rounds, same run)   writes 50% dups   random reads
#   PARALLEL, 16 threads (nbdkit's default)                     15864            20460
#   PARALLEL, --threads 1                                       24190            28057
#   SERIALIZE_ALL_REQUESTS, 16 threads                          22868            27344
# SERIALIZE_ALL_REQUESTS matches PARALLEL with one thread (also over two connections: 26505 vs
# 27041 writes, 27739 vs 29195 reads) and does not depend on how nbdkit was started.
DEFAULT_THREAD_MODEL: Final = "serialize"


T = TypeVar("T")
P = ParamSpec("P")


class NbdkitHost(Protocol):
    """The part of nbdkit's `nbdkit` module the adapter uses."""

    def set_error(self, err: int, /) -> None: ...

    def debug(self, msg: str, /) -> None: ...


class ParameterError(Exception):
    """A missing, unknown or malformed `key=value`, or a store that cannot be served.

    Raised from config, config_complete and get_ready, before nbdkit serves anything; the plugin
    turns it into one line on stderr and exit status 1 (see `exit_on_parameter_error`).
    """


def exit_on_parameter_error(callback: Callable[..., T]) -> Callable[..., T]:
    """Wrap a configuration callback so that ParameterError ends nbdkit with one line on stderr.

    nbdkit would print a raised exception with its module path and a blank line after it. These
    callbacks run before nbdkit binds a socket, writes a pidfile or starts a `--run` command, so
    there is nothing to clean up and exiting at once is safe.
    """

    @functools.wraps(callback)
    def run(*args: object) -> T:
        try:
            return callback(*args)
        except ParameterError as exc:
            os.write(2, f"nbdkit: dedupblk: error: {exc}\n".encode(errors="replace"))
            os._exit(1)

    return run


class InternalError(Exception):
    """An unexpected exception in a request, re-raised with its traceback as the message.

    nbdkit logs the message of what a callback raises (to stderr, or syslog once in the
    background), so the traceback reaches the log even though `nbdkit_plugin.py` sets
    `sys.tracebacklimit = 0` to keep deliberate errors on one line.
    """


_SIZE_PATTERN: Final = re.compile(r"(\d+)\s*([bkmgtpe]?)(?:i?b)?", re.IGNORECASE)
_SIZE_SHIFTS: Final = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def parse_size(key: str, value: str) -> int:
    """Parse `value` as nbdkit's size syntax (`4096`, `64M`, `1G`, `1GiB`: powers of 1024)."""
    match = _SIZE_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ParameterError(f"{key}={value}: not a size (use bytes or a K/M/G/T suffix)")
    return int(match.group(1)) << _SIZE_SHIFTS[match.group(2).lower()]


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ParameterError(f"{key}={value}: not a boolean (use true or false)")


def parse_count(key: str, value: str) -> int:
    if not value.strip().isdigit():
        raise ParameterError(f"{key}={value}: not a non-negative integer")
    return int(value)


def parse_path(key: str, value: str) -> str:
    if not value:
        raise ParameterError(f"{key}=: empty path")
    # nbdkit chdirs to / when it forks into the background: resolve against the start directory.
    return os.path.abspath(value)


def parse_thread_model(key: str, value: str) -> str:
    if value not in THREAD_MODELS:
        raise ParameterError(f"{key}={value}: use one of {', '.join(THREAD_MODELS)}")
    return value


_PARSERS: Final[dict[str, Callable[[str, str], object]]] = {
    "store": parse_path,
    "size": parse_size,
    "backend": parse_path,
    "backend-size": parse_size,
    "max-index-entries": parse_count,
    "max-share": parse_count,
    "readonly": parse_bool,
    "thread-model": parse_thread_model,
}
_CREATE_ONLY: Final = ("backend", "backend-size", "max-index-entries", "max-share")


@dataclass(frozen=True)
class Settings:
    """The validated parameters."""

    store: str
    size: int | None = None
    backend: str | None = None
    backend_size: int | None = None
    max_index_entries: int | None = None
    max_share: int | None = None
    readonly: bool = False
    thread_model: str = DEFAULT_THREAD_MODEL

    @classmethod
    def from_parameters(cls, params: dict[str, object]) -> Settings:
        store = params.get("store")
        if not isinstance(store, str):
            raise ParameterError("store=PATH is required")
        if "size" not in params:
            given = [key for key in _CREATE_ONLY if key in params]
            if given:
                raise ParameterError(f"{given[0]}= only applies when size= creates the store")
        size = params.get("size")
        if isinstance(size, int) and (size <= 0 or size % PAGE_SIZE):
            raise ParameterError(f"size={size}: must be a positive multiple of {PAGE_SIZE}")
        return cls(
            store=store,
            size=_optional_int(params, "size"),
            backend=_optional_str(params, "backend"),
            backend_size=_optional_int(params, "backend-size"),
            max_index_entries=_optional_int(params, "max-index-entries"),
            max_share=_optional_int(params, "max-share"),
            readonly=params.get("readonly") is True,
            thread_model=str(params.get("thread-model", DEFAULT_THREAD_MODEL)),
        )


def _optional_int(params: dict[str, object], key: str) -> int | None:
    value = params.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _optional_str(params: dict[str, object], key: str) -> str | None:
    value = params.get(key)
    return value if isinstance(value, str) else None


def _request(
    method: Callable[Concatenate[NbdkitPlugin, P], T],
) -> Callable[Concatenate[NbdkitPlugin, P], T]:
    """Run a request callback inside the error boundary (`NbdkitPlugin.failure`)."""
    callback = method.__name__

    @functools.wraps(method)
    def run(self: NbdkitPlugin, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the boundary: every failure gets an errno)
            raise self.failure(callback, exc) from None

    return run


class Connection:
    """nbdkit's per-connection handle. The store is shared; a connection only remembers whether
    nbdkit opened it read-only (`nbdkit -r`, or a client that asked for read-only)."""

    __slots__ = ("readonly",)

    def __init__(self, readonly: bool) -> None:
        self.readonly = readonly


class NbdkitPlugin:
    """One served store: the state behind every callback of one nbdkit process."""

    def __init__(self, host: NbdkitHost) -> None:
        self._host = host
        self._params: dict[str, object] = {}
        self._settings: Settings | None = None
        self._store: Store | None = None

    # ---- configuration (foreground, before serving) ----

    def config(self, key: str, value: str) -> None:
        parser = _PARSERS.get(key)
        if parser is None:
            raise ParameterError(f"unknown parameter {key}= (known: {', '.join(_PARSERS)})")
        if key in self._params:
            raise ParameterError(f"{key}= given twice")
        self._params[key] = parser(key, value)

    def config_complete(self) -> None:
        self._settings = Settings.from_parameters(self._params)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise ParameterError("store=PATH is required")
        return self._settings

    def thread_model(self) -> int:
        return THREAD_MODELS[self.settings.thread_model]

    def get_ready(self) -> None:
        settings = self.settings
        try:
            if settings.size is not None:
                try:
                    create_store(
                        settings.store,
                        settings.size,
                        backend=settings.backend,
                        backend_size=settings.backend_size,
                        max_index_entries=settings.max_index_entries,
                        max_share=254 if settings.max_share is None else settings.max_share,
                    )
                    self._host.debug(f"dedupblk: created {settings.store}")
                except StoreExists:
                    pass
            # Open once in the foreground so a bad store stops nbdkit before it serves, then close:
            # the serving handle is opened after nbdkit's fork (see the module docstring).
            with open_store(settings.store, readonly=settings.readonly) as store:
                size = store.size
        except NotAStore as exc:
            raise ParameterError(f"{exc} (size=SIZE creates it)") from None
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        if settings.size is not None and settings.size != size:
            raise ParameterError(
                f"size={settings.size}: store={settings.store} already exists with size {size}"
            )

    def after_fork(self) -> None:
        settings = self.settings
        try:
            self._store = open_store(settings.store, readonly=settings.readonly)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        self._host.debug(f"dedupblk: serving {settings.store} ({self._store.size} bytes)")

    def cleanup(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            raise RuntimeError("the store is not open (after_fork did not run or failed)")
        return store

    # ---- the one error boundary ----

    def failure(self, callback: str, exc: Exception) -> Exception:
        """Report `exc` to nbdkit as the failed request's errno and return what to raise.

        A StoreError is deliberate and carries its errno; the caller re-raises it and nbdkit logs
        its one-line message. Anything else is a bug: EIO, and an InternalError whose message is
        the traceback, so it reaches nbdkit's log whatever `sys.tracebacklimit` says.
        """
        if isinstance(exc, StoreError):
            self._host.set_error(exc.errno)
            return exc
        self._host.set_error(errno.EIO)
        trace = "".join(traceback.format_exception(exc, limit=64)).rstrip()
        return InternalError(f"{callback}: unexpected error, returning EIO\n{trace}")

    # ---- connections ----

    def open(self, readonly: bool) -> Connection:
        return Connection(bool(readonly))

    def get_size(self, h: Connection) -> int:
        return self.store.size

    def block_size(self, h: Connection) -> tuple[int, int, int]:
        return (MINIMUM_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAXIMUM_BLOCK_SIZE)

    def can_write(self, h: Connection) -> bool:
        return not self.settings.readonly

    def can_flush(self, h: Connection) -> bool:
        return True

    def can_trim(self, h: Connection) -> bool:
        return True

    def can_zero(self, h: Connection) -> bool:
        return True

    def can_fast_zero(self, h: Connection) -> bool:
        # Zeroing only rewrites map entries, never data slots: it is always faster than writing.
        return True

    def can_extents(self, h: Connection) -> bool:
        return True

    def can_multi_conn(self, h: Connection) -> bool:
        return True

    def can_fua(self, h: Connection) -> int:
        return FUA_NATIVE

    def is_rotational(self, h: Connection) -> bool:
        return False

    # ---- requests ----

    @_request
    def pread(self, h: Connection, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.store.read(offset, len(buf))

    @_request
    def pwrite(self, h: Connection, buf: memoryview, offset: int, flags: int) -> None:
        self.store.write(offset, buf, fua=bool(flags & FLAG_FUA))

    @_request
    def flush(self, h: Connection, flags: int) -> None:
        self.store.flush()

    @_request
    def trim(self, h: Connection, count: int, offset: int, flags: int) -> None:
        self.store.trim(offset, count, fua=bool(flags & FLAG_FUA))

    @_request
    def zero(self, h: Connection, count: int, offset: int, flags: int) -> None:
        # FLAG_MAY_TRIM needs nothing: whole zeroed pages are unmapped either way. FLAG_FAST_ZERO
        # needs nothing: zeroing is always fast (see can_fast_zero).
        self.store.write_zeroes(offset, count, fua=bool(flags & FLAG_FUA))

    @_request
    def extents(
        self, h: Connection, count: int, offset: int, flags: int
    ) -> list[tuple[int, int, int]]:
        found = self.store.extents(offset, min(count, MAXIMUM_EXTENTS_SPAN))
        if flags & FLAG_REQ_ONE:
            found = found[:1]
        return [
            (start, length, EXTENT_HOLE_ZERO if is_hole else EXTENT_DATA)
            for start, length, is_hole in found
        ]
