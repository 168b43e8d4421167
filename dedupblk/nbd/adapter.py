"""The nbdkit frontend's logic: nbdkit's Python-plugin callbacks translated into calls on the
device contract (`dedupblk.device.BlockDevice`), here an open store.

`dedupblk/frontends/nbdkit_plugin.py` is the file nbdkit runs (as `__main__`, inside its embedded
interpreter); it only binds the callbacks of one `NbdkitPlugin` to the module-level names nbdkit
looks up. Everything else lives here so that it can be imported and tested outside nbdkit: the
`nbdkit` module exists only inside nbdkit, so the plugin hands it in as `host` (tests pass a fake).
The launcher that runs nbdkit for ``dedupblk serve`` is `dedupblk.nbd.launcher`.

Life cycle, in nbdkit's order (see nbdkit-plugin(3)):

- `config(key, value)` once per `key=value`: each value is parsed at once (`dedupblk.nbd.params`),
  so a bad one is reported against its key.
- `config_complete()`: cross-parameter checks (a store is named; creation options need `size=`).
- `get_ready()`: runs in the foreground before nbdkit binds its socket or forks. Creates the store
  when `size=` is given and it is missing, then opens and closes it once, so that a missing,
  locked or mismatched store stops nbdkit with a one-line error before it serves anything.
- `after_fork()`: opens the store for serving. An LMDB environment must not cross a fork, and
  nbdkit forks into the background between `get_ready` and `after_fork`. With `control-fd=`, it
  also starts the control thread (`NbdkitPlugin.stop_when_told`). It starts the threads of the
  server's counters too (`dedupblk.counters`): the counters file `dedupblk stats`
  reads (`dedupblk.runtime`) and, with `metrics=`, the HTTP server of the Prometheus endpoint
  (its address was tried in `get_ready`, so a taken one stops nbdkit before it serves).
- request callbacks (`pread`, `pwrite`, ...), from nbdkit's worker threads. There is one store for
  all connections; it is thread-safe and a flush makes every connection's writes durable, which
  is why `can_multi_conn` is true.
- `cleanup()`: closes the store (flushing what is buffered and marking it clean) before nbdkit
  exits. nbdkit calls it only once every connection is gone, and on SIGTERM an idle client
  holds its connection until it sends a request or leaves: nbdkit 1.32 has no timeout. So when
  `dedupblk serve` is told to stop it closes the control pipe, and the control thread closes the
  store itself, asks nbdkit to shut down, and if connections still hold nbdkit after
  `SHUTDOWN_GRACE_SECONDS`, ends the process (the store is closed by then: nothing is lost).

Errors are translated in one place, `NbdkitPlugin.failure`: a `DedupblkError` becomes its `.errno`,
anything else is a bug and becomes EIO with its traceback in nbdkit's error log. nbdkit then
answers that one request with the error and keeps serving. Each request is counted once as it
enters that boundary (`_request`), each failure once in `failure`.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from typing import TYPE_CHECKING, Concatenate, Final, NoReturn, ParamSpec, Protocol, TypeVar

from dedupblk.counters import ServerCounters, check_address_free
from dedupblk.device import BlockDevice
from dedupblk.errors import DedupblkError, MetricsError, NotAStore, StoreExists
from dedupblk.runtime import CountersWriter
from dedupblk.sizes import format_size
from dedupblk.store import PAGE_SIZE, Store, create_store, open_store
from dedupblk.store.format import DEFAULT_MAX_SHARE

from .params import (
    DEFAULT_THREAD_MODEL,
    HELP,
    THREAD_MODELS,
    ParameterError,
    Settings,
    parse_parameter,
)

if TYPE_CHECKING:
    from dedupblk.metrics import ServerMetrics

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

# After the control pipe closes: how long nbdkit may take to end by itself (its connections
# finish their requests and go) before the control thread ends the process.
SHUTDOWN_GRACE_SECONDS: Final = 2.0


# The store call each request callback becomes: the ``op`` label of the request counters.
REQUEST_OPS: Final = {
    "pread": "read",
    "pwrite": "write",
    "zero": "write_zeroes",
    "trim": "trim",
    "flush": "flush",
    "extents": "extents",
}

T = TypeVar("T")
P = ParamSpec("P")


class NbdkitHost(Protocol):
    """The part of nbdkit's `nbdkit` module the adapter uses."""

    def set_error(self, err: int, /) -> None: ...

    def debug(self, msg: str, /) -> None: ...

    def shutdown(self) -> None: ...


class InternalError(Exception):
    """An unexpected exception in a request, re-raised with its traceback as the message.

    nbdkit logs the message of what a callback raises (to stderr, or syslog once in the
    background), so the traceback reaches the log even though `nbdkit_plugin.py` sets
    `sys.tracebacklimit = 0` to keep deliberate errors on one line.
    """


def _request(
    method: Callable[Concatenate[NbdkitPlugin, P], T],
) -> Callable[Concatenate[NbdkitPlugin, P], T]:
    """Run a request callback inside the error boundary (`NbdkitPlugin.failure`), counted."""
    callback = method.__name__
    op = REQUEST_OPS[callback]

    @functools.wraps(method)
    def run(self: NbdkitPlugin, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counters = self._counters
        if counters is not None:
            counters.count(op)
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the boundary: every failure gets an errno)
            raise self.failure(callback, exc) from None

    return run


class Connection:
    """nbdkit's per-connection handle. Every connection shares the one open store, so a handle
    carries nothing: nbdkit itself refuses writes on a read-only connection."""

    __slots__ = ()


class NbdkitPlugin:
    """One served store: the state behind every callback of one nbdkit process."""

    def __init__(
        self, host: NbdkitHost, *, exit_process: Callable[[int], NoReturn] = os._exit
    ) -> None:
        self._host = host
        self._exit_process = exit_process
        self._params: dict[str, object] = {}
        self._settings: Settings | None = None
        self._store: Store | None = None
        # Held while the store closes: cleanup and the control thread may both try.
        self._closing = threading.Lock()
        self._counters: ServerCounters | None = None  # once serving (see `_request`)
        self._metrics: ServerMetrics | None = None  # with metrics=
        self._counters_file: CountersWriter | None = None

    # ---- configuration (foreground, before serving) ----

    def config(self, key: str, value: str) -> None:
        if key in self._params:
            raise ParameterError(f"{key}= given twice")
        self._params[key] = parse_parameter(key, value)

    def config_complete(self) -> None:
        self._settings = Settings.from_parameters(self._params)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise ParameterError("store=PATH is required")
        return self._settings

    def thread_model(self) -> int:
        # `nbdkit ... --dump-plugin` asks for it after config but without config_complete, so
        # with no settings yet: answer from the parameters given, if any.
        if self._settings is None:
            chosen = self._params.get("thread-model", DEFAULT_THREAD_MODEL)
            return THREAD_MODELS[str(chosen)]
        return THREAD_MODELS[self.settings.thread_model]

    def dump_plugin(self) -> list[str]:
        """The lines `nbdkit python PLUGIN --dump-plugin` adds to nbdkit's own: this version and
        every parameter with its help. It runs without a store and without config_complete."""
        lines = [f"dedupblk_version={version('dedupblk')}"]
        lines += [f"dedupblk_parameter_{key}={text}" for key, text in HELP.items()]
        return lines

    def get_ready(self) -> None:
        settings = self.settings
        if settings.control_fd is not None:
            try:
                is_pipe = stat.S_ISFIFO(os.fstat(settings.control_fd).st_mode)
            except OSError:
                is_pipe = False
            if not is_pipe:
                raise ParameterError(f"control-fd={settings.control_fd}: not an open pipe")
        try:
            if settings.size is not None:
                try:
                    create_store(
                        settings.store,
                        settings.size,
                        backend=settings.backend,
                        backend_size=settings.backend_size,
                        max_index_entries=settings.max_index_entries,
                        max_share=(
                            DEFAULT_MAX_SHARE if settings.max_share is None else settings.max_share
                        ),
                    )
                    self._host.debug(f"dedupblk: created {settings.store}")
                except StoreExists:
                    pass
            # Open once in the foreground so a bad store stops nbdkit before it serves, then close:
            # the serving handle is opened after nbdkit's fork (see the module docstring).
            with open_store(settings.store, readonly=settings.readonly) as store:
                size = store.size
            if settings.metrics is not None:
                check_address_free(settings.metrics)
        except NotAStore as exc:
            raise ParameterError(f"{exc} (size=SIZE creates it)") from None
        except DedupblkError as exc:
            raise ParameterError(str(exc)) from None
        if settings.size is not None and settings.size != size:
            raise ParameterError(
                f"size={settings.size}: store={settings.store} already exists with size {size}"
            )

    def after_fork(self) -> None:
        settings = self.settings
        counters = ServerCounters()
        try:
            self._store = open_store(settings.store, readonly=settings.readonly, observer=counters)
        except DedupblkError as exc:
            raise ParameterError(str(exc)) from None
        if settings.metrics is not None:
            from dedupblk.metrics import ServerMetrics  # noqa: PLC0415  (only when asked for)

            metrics = ServerMetrics(settings.store, counters)
            metrics.watch(self._store.statistics)
            try:
                metrics.serve(settings.metrics)
            except MetricsError as exc:
                self._store.close()
                raise ParameterError(str(exc)) from None
            self._metrics = metrics
        self._counters_file = CountersWriter(settings.store, counters.snapshot)
        self._counters_file.start()
        self._counters = counters
        self._host.debug(f"dedupblk: serving {settings.store} ({self._store.size} bytes)")
        if settings.control_fd is not None:
            threading.Thread(
                target=self.stop_when_told,
                args=(settings.control_fd,),
                name="dedupblk-control",
                daemon=True,
            ).start()

    def cleanup(self) -> None:
        self._close_store()

    def _close_store(self) -> None:
        # The store object stays: requests still in flight or arriving later get "the store is
        # closed" (EIO), never an unopened store.
        with self._closing:
            if self._metrics is not None:
                self._metrics.stop_serving()  # no scrape of a closed store
            try:
                if self._store is not None:
                    self._store.close()
            finally:
                if self._counters_file is not None:
                    self._counters_file.stop()  # the last counters

    def stop_when_told(self, control_fd: int) -> None:
        """Wait until the control pipe's write end is closed (or anything is written to it),
        then close the store, shut nbdkit down, and end the process if connections still hold
        it after the grace period."""
        os.read(control_fd, 1)
        try:
            self._close_store()
        except Exception as exc:  # noqa: BLE001  (released anyway; the exit status says it failed)
            trace = "".join(traceback.format_exception(exc, limit=64)).rstrip()
            os.write(2, f"nbdkit: dedupblk: error: closing the store: {trace}\n".encode())
            self._exit_process(1)
        self._host.debug("dedupblk: told to stop; store closed")
        self._host.shutdown()
        time.sleep(SHUTDOWN_GRACE_SECONDS)
        self._host.debug("dedupblk: clients still connected after the grace period; exiting")
        self._exit_process(0)

    @property
    def device(self) -> BlockDevice:
        """What the request callbacks serve: the store opened in `after_fork`."""
        store = self._store
        if store is None:
            raise RuntimeError("the store is not open (after_fork did not run or failed)")
        return store

    # ---- the one error boundary ----

    def failure(self, callback: str, exc: Exception) -> Exception:
        """Report `exc` to nbdkit as the failed request's errno and return what to raise.

        A DedupblkError is deliberate and carries its errno; the caller re-raises it and nbdkit logs
        its one-line message. Anything else is a bug: EIO, and an InternalError whose message is
        the traceback, so it reaches nbdkit's log whatever `sys.tracebacklimit` says.
        """
        metrics, op = self._counters, REQUEST_OPS.get(callback, "other")
        if isinstance(exc, DedupblkError):
            self._host.set_error(exc.errno)
            if metrics is not None:
                metrics.request_failed(op, exc.errno)
            return exc
        self._host.set_error(errno.EIO)
        if metrics is not None:
            metrics.request_failed(op, errno.EIO)
        trace = "".join(traceback.format_exception(exc, limit=64)).rstrip()
        return InternalError(f"{callback}: unexpected error, returning EIO\n{trace}")

    # ---- connections ----

    def open(self, readonly: bool) -> Connection:
        return Connection()

    def get_size(self, h: Connection) -> int:
        return self.device.size

    def export_description(self, h: Connection) -> str:
        """What `nbdinfo URI` shows as ``description:``."""
        store = self._store
        if store is None:
            raise RuntimeError("the store is not open (after_fork did not run or failed)")
        mode = ", read-only" if store.readonly else ""
        return (
            f"dedupblk store {store.path} ({format_size(store.size)}, "
            f"format {store.config.format_version}{mode})"
        )

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
        buf[:] = self.device.read(offset, len(buf))

    @_request
    def pwrite(self, h: Connection, buf: memoryview, offset: int, flags: int) -> None:
        self.device.write(offset, buf, fua=bool(flags & FLAG_FUA))

    @_request
    def flush(self, h: Connection, flags: int) -> None:
        self.device.flush()

    @_request
    def trim(self, h: Connection, count: int, offset: int, flags: int) -> None:
        self.device.trim(offset, count, fua=bool(flags & FLAG_FUA))

    @_request
    def zero(self, h: Connection, count: int, offset: int, flags: int) -> None:
        # FLAG_MAY_TRIM needs nothing: whole zeroed pages are unmapped either way. FLAG_FAST_ZERO
        # needs nothing: zeroing is always fast (see can_fast_zero).
        self.device.write_zeroes(offset, count, fua=bool(flags & FLAG_FUA))

    @_request
    def extents(
        self, h: Connection, count: int, offset: int, flags: int
    ) -> list[tuple[int, int, int]]:
        found = self.device.extents(offset, min(count, MAXIMUM_EXTENTS_SPAN))
        if flags & FLAG_REQ_ONE:
            found = found[:1]
        return [
            (start, length, EXTENT_HOLE_ZERO if is_hole else EXTENT_DATA)
            for start, length, is_hole in found
        ]
