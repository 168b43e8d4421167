"""The LMDB metadata accessor: opens the environment and its sub-databases, decodes the records of
`dedupblk.store.format`, and grows the map when LMDB runs out of map space.

A writer opens the environment either durable (``MDB_NOMETASYNC``: every commit syncs its data
pages) or volatile (``MDB_NOSYNC``); which one, and why each is safe where it is used, is in the
format's "Write order and durability". `Meta.sync` makes the last commit durable.

In a preallocated store (``info/prealloc``, see "Preallocated stores" in the format) a writer maps
exactly the preallocated part of ``data.mdb`` while the data fits: LMDB never writes past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import lmdb

from ..errors import FormatError, NotAStore, StoreError, StoreFull, SyncFailed
from .format import (
    ALL_DBS,
    DB_FILLS,
    DB_FPS,
    DB_INDEX,
    DB_INFO,
    DB_MAP,
    DB_REFS,
    FILE_MODE,
    FORMAT,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    KEY_CONFIG,
    KEY_FORMAT,
    KEY_PREALLOC,
    KEY_STATE,
    META_DIR,
    PREALLOC,
    Config,
    State,
)

INITIAL_MAP_SIZE = 1 << 20  # grows by doubling; every byte of it is allocated on disk
MAX_DBS = 8
log = logging.getLogger(__name__)
# LMDB forbids opening one environment twice in a process, so statistics taken while this process
# serves the store must reuse the open environment: the only module-level state in the store.
_OPEN: dict[str, Meta] = {}
T = TypeVar("T")


class damaged_metadata:  # noqa: N801  (used as a function: ``with damaged_metadata(path):``)
    """Turn what LMDB or a record decoder raises on damaged metadata into one `FormatError`.

    A class, not a `contextlib.contextmanager`: every read request enters one, and a class is
    cheaper to enter than a generator."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if isinstance(exc, METADATA_ERRORS):
            raise_damaged(self.where, exc)


# What LMDB or a record decoder raises on damaged metadata. A hot path catches these itself and
# calls `raise_damaged` (a ``try`` costs nothing until it catches; a ``with`` costs a call on the
# way in and one on the way out).
METADATA_ERRORS = (lmdb.Error, struct.error, UnicodeDecodeError)


def raise_damaged(where: str, exc: BaseException) -> NoReturn:
    """Raise the one `FormatError` for damaged metadata in place of ``exc``, one of
    `METADATA_ERRORS`; but ``exc`` itself if it is `lmdb.MapFullError`: a full map is no damage."""
    if isinstance(exc, lmdb.MapFullError):
        raise exc
    raise FormatError(f"{where}: the metadata is damaged ({exc}); see `dedupblk check`") from exc


def read_format(env: Any, info: Any, where: str) -> int:
    """The format version in ``info/format``; `NotAStore` for a foreign environment."""
    with env.begin() as txn:
        raw = txn.get(KEY_FORMAT, db=info)
    if raw is None:
        raise NotAStore(f"{where} is not a dedupblk store (no format record)")
    try:
        magic, version = FORMAT.unpack(raw)
    except struct.error as exc:
        raise FormatError(f"{where}: undecodable format record") from exc
    if magic != FORMAT_MAGIC:
        raise NotAStore(f"{where} is not a dedupblk store (bad magic)")
    version_number: int = version
    return version_number


def _check_size(env: Any, store_dir: str, data_mdb: str) -> None:
    """Refuse a ``data.mdb`` shorter than the pages LMDB says are in use: reading a page past its
    end through the map would kill the process with SIGBUS."""
    info = env.info()
    used = (info["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_mdb)
    if size < used:
        raise FormatError(f"{store_dir}: the metadata is truncated ({size} bytes of {used} in use)")


def refuse_truncated(store_dir: str) -> None:
    """`FormatError` if the store's ``data.mdb`` is shorter than the pages in use."""
    path = os.path.join(store_dir, META_DIR)
    _refuse_truncated(store_dir, path, os.path.join(path, "data.mdb"))


def _refuse_truncated(store_dir: str, path: str, data_mdb: str) -> None:
    """The size check, before a writer opens the file: opening it writable would first extend
    the file with zeros to the map size, and the damage would no longer show."""
    try:
        probe = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=MAX_DBS)
    except lmdb.Error as exc:
        raise FormatError(f"{store_dir}: cannot open its metadata: {exc}") from exc
    try:
        _check_size(probe, store_dir, data_mdb)
    finally:
        probe.close()


class Meta:
    """One store's LMDB environment and its sub-databases (format version 2)."""

    def __init__(
        self,
        store_dir: str,
        *,
        readonly: bool,
        create: bool = False,
        map_size: int = 0,
        durable: bool = True,
        subdir: str = META_DIR,
    ) -> None:
        path = os.path.join(store_dir, subdir)
        data_mdb = os.path.join(path, "data.mdb")
        if not create and not os.path.exists(data_mdb):
            raise NotAStore(f"{store_dir} is not a dedupblk store (no {subdir}/data.mdb)")
        self.store_dir = store_dir
        self.data_mdb = data_mdb
        self._key = os.path.realpath(path)
        if not map_size:
            # A writer maps data.mdb writable and LMDB extends the file to the map: keep an
            # existing store's map at its file's size (a preallocated file is mapped exactly).
            map_size = (os.path.getsize(data_mdb) if os.path.exists(data_mdb) else 0) or (
                INITIAL_MAP_SIZE
            )
        if not readonly and not create:
            _refuse_truncated(store_dir, path, data_mdb)
        old_umask = os.umask(0o077)  # LMDB makes its files 0644 otherwise (format: 0600)
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=MAX_DBS,
                readonly=readonly,
                sync=durable,
                metasync=False,
                readahead=False,
                # A writer changes pages in the shared map (MDB_WRITEMAP) instead of writing each
                # dirty page with pwrite at commit (less CPU per commit). Every block of the map
                # is allocated first (`_reserve`): a write through the map into a hole of a full
                # filesystem would kill the process with SIGBUS.
                writemap=not readonly,
                create=create,
                subdir=True,
                mode=FILE_MODE,
            )
        except lmdb.Error as exc:
            raise FormatError(f"{store_dir}: cannot open its metadata: {exc}") from exc
        finally:
            os.umask(old_umask)
        try:
            self._open_dbs(create=create)
            if not readonly:
                self._reserve(self.env.info()["map_size"])
        except BaseException:
            self.env.close()
            raise
        self._reader: Any = None
        if not readonly and self.preallocated:
            # The map is the written part of data.mdb (LMDB raises it to what is in use): a
            # server that locks its memory (ublk) locks all of it now, and the map never has
            # to grow, nor be faulted in, while serving.
            self.env.set_mapsize(self.preallocated)
        _OPEN[self._key] = self

    def _open_dbs(self, *, create: bool) -> None:
        where = self.store_dir
        with damaged_metadata(where):
            self._check_size()
            try:
                self.info = self.env.open_db(DB_INFO, create=create)
            except lmdb.NotFoundError:
                raise NotAStore(f"{where} is not a dedupblk store (no info database)") from None
            if not create:
                version = read_format(self.env, self.info, where)
                if version == 1:
                    raise FormatError(
                        f"{where} has format version 1: run `dedupblk upgrade {where}` "
                        f"to convert it to version {FORMAT_VERSION}"
                    )
                if version != FORMAT_VERSION:
                    raise FormatError(
                        f"{where} has format version {version}; this is {FORMAT_VERSION}"
                    )
            try:
                dbs = {name: self.env.open_db(name, create=create) for name in ALL_DBS}
            except lmdb.NotFoundError:
                raise FormatError(f"{where}: a sub-database is missing") from None
            self.map = dbs[DB_MAP]
            self.fills = dbs[DB_FILLS]
            self.refs = dbs[DB_REFS]
            self.fps = dbs[DB_FPS]
            self.index = dbs[DB_INDEX]
            self.preallocated = 0 if create else self._read_prealloc()

    def _check_size(self) -> None:
        _check_size(self.env, self.store_dir, self.data_mdb)

    def _read_prealloc(self) -> int:
        """``info/prealloc``: bytes of data.mdb written at create, 0 when not preallocated."""
        with self.env.begin() as txn:
            raw = txn.get(KEY_PREALLOC, db=self.info)
        if raw is None:
            return 0
        size: int = PREALLOC.unpack(raw)[0]
        return size

    @staticmethod
    def opened(store_dir: str) -> Meta | None:
        """The environment of ``store_dir`` if this process has it open."""
        return _OPEN.get(os.path.realpath(os.path.join(store_dir, META_DIR)))

    def read_header(self) -> tuple[Config, State]:
        """Decode config and state."""
        store_dir = self.store_dir
        with damaged_metadata(store_dir), self.begin_read() as txn:
            raw_config = txn.get(KEY_CONFIG, db=self.info)
            raw_state = txn.get(KEY_STATE, db=self.info)
            if raw_config is None or raw_state is None:
                raise FormatError(f"{store_dir}: the config or state record is missing")
            version = FORMAT.unpack(txn.get(KEY_FORMAT, db=self.info))[1]
            config = dataclasses.replace(Config.unpack(raw_config), format_version=version)
            return config, State.unpack(raw_state)

    def begin_read(self) -> Any:
        """A read transaction; in a process that only reads, the writer (another process) may
        have grown the map meanwhile: then map the new size and begin again."""
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # adopt the size the writer set
            return self.env.begin(buffers=True)

    def reader(self) -> Any:
        """A read transaction showing the last commit, reused between commits (beginning one per
        request costs more than the lookups it serves). For the store's lock holder only."""
        if self._reader is None:
            self._reader = self.env.begin(buffers=True)
        return self._reader

    def drop_reader(self) -> None:
        """End the reused read transaction: it would show a stale snapshot and keep LMDB from
        reusing the pages that later commits free."""
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def write(
        self,
        body: Callable[[Any], T],
        *,
        before_commit: Callable[[], None] | None = None,
        unlocked: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
    ) -> T:
        """Run ``body(txn)`` in one write transaction and commit it, growing the map when full.

        ``before_commit`` runs between the body and the commit (the data's sync); ``unlocked``
        is entered around both (the caller's lock let go while they wait for the disk).
        ``body`` must be safe to run again from the start: on ``MapFullError`` the transaction is
        aborted (nothing of it is kept), the map doubles and ``body`` runs anew.
        """
        self._grow_early()
        while True:
            self.drop_reader()  # its buffers would be invalid after the commit anyway
            txn = self.env.begin(write=True, buffers=True)
            try:
                result = body(txn)
            except lmdb.MapFullError:
                txn.abort()
                grown = self._grown_map_size()
                self._reserve(grown)
                self.drop_reader()
                self.env.set_mapsize(grown)
                continue
            except BaseException:
                txn.abort()
                raise
            try:
                with unlocked() if unlocked is not None else contextlib.nullcontext():
                    if before_commit is not None:
                        before_commit()
                    txn.commit()
            except lmdb.MapFullError:
                grown = self._grown_map_size()
                self._reserve(grown)
                self.drop_reader()  # one begun while unlocked
                self.env.set_mapsize(grown)
                continue
            except lmdb.Error as exc:
                # A durable commit syncs: a failure leaves the disk's state unknown.
                raise SyncFailed(f"committing metadata: {exc}") from exc
            except BaseException:
                txn.abort()
                raise
            finally:
                self.drop_reader()  # one begun while unlocked shows the state before this commit
            return result

    def _grow_early(self) -> None:
        """Grow the map before a transaction when it is three-quarters used: growing only once
        LMDB reports it full would run the whole transaction twice."""
        info = self.env.info()
        if (info["last_pgno"] + 1) * self.env.stat()["psize"] * 4 > info["map_size"] * 3:
            if self.preallocated and info["map_size"] >= self.preallocated:
                return  # grown past the preallocation only when it is full (see _grown_map_size)
            grown = self._grown_map_size()
            self.drop_reader()
            try:
                self._reserve(grown)
            except StoreFull as exc:  # only a map that is really full must grow
                log.warning("cannot grow the metadata's map ahead of need: %s", exc)
                return
            self.env.set_mapsize(grown)

    def _reserve(self, size: int) -> None:
        """Allocate every block of data.mdb below ``size`` (``posix_fallocate``; data is kept), so
        that no write through the writable map can hit a hole on a full filesystem. `StoreFull`
        when the filesystem has no room for it. The new size is synced with the file."""
        try:
            fd = os.open(self.data_mdb, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < size or os.fstat(fd).st_blocks * 512 < size:
                    os.posix_fallocate(fd, 0, size)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(
                    f"no room for {size} bytes of metadata in {self.data_mdb}: {exc.strerror}"
                ) from exc
            raise StoreError(f"cannot allocate {self.data_mdb}: {exc.strerror}") from exc

    def _grown_map_size(self) -> int:
        """Twice the map, but no further than the preallocated part of data.mdb until the map
        fills it (a reader's map may be smaller): past it, LMDB extends the file, which
        allocates file blocks while serving."""
        current: int = self.env.info()["map_size"]
        grown = current * 2
        if self.preallocated:
            if current < self.preallocated:
                return min(grown, self.preallocated)
            log.warning(
                "the store's metadata outgrew its preallocated %d bytes: data.mdb grows from now "
                "on, which allocates file blocks while serving (not swap-safe)",
                self.preallocated,
            )
        return grown

    def entries(self, txn: Any, db: Any) -> int:
        count: int = txn.stat(db)["entries"]
        return count

    def used_bytes(self) -> int:
        """LMDB's high-water mark: the pages below ``last_pgno`` (in use or free inside)."""
        info = self.env.info()
        stat = self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])

    def sync(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise SyncFailed(f"syncing metadata: {exc}") from exc

    def close(self) -> None:
        if _OPEN.get(self._key) is self:
            del _OPEN[self._key]
        self.drop_reader()
        self.env.close()
