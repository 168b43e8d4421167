"""The LMDB metadata accessor: opens the environment and its sub-databases, decodes the records of
`dedupblk.store.format`, and grows the map when LMDB runs out of map space.

Commits are not synced (``MDB_NOSYNC``): a committed transaction is in the page cache and survives a
kill of the process; `Meta.sync` makes everything committed durable. The store calls it on flush.

In a preallocated store (``info/prealloc``, see "Preallocated stores" in the format) a writer maps
exactly the preallocated part of ``data.mdb`` while the data fits: LMDB never writes past it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from ..errors import FormatError, NotAStore, StoreError, StoreFull
from .format import (
    ALL_DBS,
    DB_AGE,
    DB_DEFERRED,
    DB_FREE,
    DB_INDEX,
    DB_INFO,
    DB_MAP,
    DB_REFS,
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

INITIAL_MAP_SIZE = 8 << 20  # grows by doubling; every byte of it is allocated on disk
log = logging.getLogger(__name__)
# LMDB forbids opening one environment twice in a process, so statistics taken while this process
# serves the store must reuse the open environment: the only module-level state in the store.
_OPEN: dict[str, Meta] = {}
T = TypeVar("T")


class Meta:
    """One store's LMDB environment and its sub-databases."""

    def __init__(
        self, store_dir: str, *, readonly: bool, create: bool = False, map_size: int = 0
    ) -> None:
        path = os.path.join(store_dir, META_DIR)
        data_mdb = os.path.join(path, "data.mdb")
        if not create and not os.path.exists(data_mdb):
            raise NotAStore(f"{store_dir} is not a dedupblk store (no {META_DIR}/data.mdb)")
        if not map_size:
            # A writer maps data.mdb writable and LMDB extends the file to the map: keep an
            # existing store's map at its file's size (a preallocated file is mapped exactly).
            map_size = (os.path.getsize(data_mdb) if os.path.exists(data_mdb) else 0) or (
                INITIAL_MAP_SIZE
            )
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(ALL_DBS),
                readonly=readonly,
                sync=False,
                metasync=False,
                readahead=False,
                # A writer changes pages in the shared map (MDB_WRITEMAP) instead of writing
                # each dirty page with pwrite at commit: about a quarter less CPU per ublk pass,
                # and with the metadata on disk the whole-machine swap test hung far less often
                # with it (see "Swap placement" in docs/swap.md).  Every block of
                # the map is
                # allocated first (`_reserve`): a write through the map into a hole of a full
                # filesystem would kill the process with SIGBUS.
                writemap=not readonly,
                create=create,
                subdir=True,
            )
        except lmdb.Error as exc:
            raise NotAStore(f"{store_dir}: cannot open its metadata: {exc}") from exc
        try:
            self.dbs = {name: self.env.open_db(name, create=not readonly) for name in ALL_DBS}
        except lmdb.NotFoundError:
            self.env.close()
            raise NotAStore(f"{store_dir} is not a dedupblk store (no sub-databases)") from None
        self._key = os.path.realpath(path)
        self.store_dir = store_dir
        if not readonly:
            try:
                self._reserve(self.env.info()["map_size"])
            except BaseException:
                self.env.close()
                raise
        self.info = self.dbs[DB_INFO]
        self.map = self.dbs[DB_MAP]
        self.refs = self.dbs[DB_REFS]
        self.index = self.dbs[DB_INDEX]
        self.age = self.dbs[DB_AGE]
        self.free = self.dbs[DB_FREE]
        self.deferred = self.dbs[DB_DEFERRED]
        self._reader: Any = None
        self.preallocated = self._read_prealloc()
        if not readonly and self.preallocated:
            # The map is the written part of data.mdb (LMDB raises it to what is in use): a
            # server that locks its memory (ublk) locks all of it now, and the map never has
            # to grow, nor be faulted in, while serving.
            self.env.set_mapsize(self.preallocated)
        _OPEN[self._key] = self

    def _read_prealloc(self) -> int:
        """``info/prealloc``: bytes of data.mdb written at create, 0 when not preallocated."""
        with self.env.begin() as txn:
            raw = txn.get(KEY_PREALLOC, db=self.info)
        if raw is None:
            return 0
        try:
            size: int = PREALLOC.unpack(raw)[0]
        except Exception as exc:
            raise FormatError(f"undecodable prealloc record in {self._key}") from exc
        return size

    @staticmethod
    def opened(store_dir: str) -> Meta | None:
        """The environment of ``store_dir`` if this process has it open."""
        return _OPEN.get(os.path.realpath(os.path.join(store_dir, META_DIR)))

    def read_header(self) -> tuple[Config, State]:
        store_dir = self.store_dir
        """Decode format, config and state; refuse a foreign or newer store."""
        with self.env.begin() as txn:
            raw_format = txn.get(KEY_FORMAT, db=self.info)
            raw_config = txn.get(KEY_CONFIG, db=self.info)
            raw_state = txn.get(KEY_STATE, db=self.info)
        if raw_format is None or raw_config is None or raw_state is None:
            raise NotAStore(f"{store_dir} is not a dedupblk store (no format record)")
        try:
            magic, version = FORMAT.unpack(raw_format)
        except Exception as exc:
            raise FormatError(f"{store_dir}: undecodable format record") from exc
        if magic != FORMAT_MAGIC:
            raise NotAStore(f"{store_dir} is not a dedupblk store (bad magic)")
        if version != FORMAT_VERSION:
            raise FormatError(f"{store_dir} has format version {version}; this is {FORMAT_VERSION}")
        try:
            return Config.unpack(raw_config), State.unpack(raw_state)
        except Exception as exc:
            raise FormatError(f"{store_dir}: undecodable config or state record") from exc

    def reader(self) -> Any:
        """A read transaction showing the last commit, reused between commits (beginning one per
        request costs more than the lookups it serves). For the store's lock holder only."""
        if self._reader is None:
            self._reader = self.env.begin(buffers=False)
        return self._reader

    def _drop_reader(self) -> None:
        """End the reused read transaction: it would show a stale snapshot and keep LMDB from
        reusing the pages that later commits free."""
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def write(self, body: Callable[[Any], T]) -> T:
        """Run ``body(txn)`` in one write transaction and commit it, growing the map when full.

        ``body`` must be safe to run again from the start: on ``MapFullError`` the transaction is
        aborted (nothing of it is kept), the map doubles and ``body`` runs anew.
        """
        while True:
            txn = self.env.begin(write=True)
            try:
                result = body(txn)
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                self._drop_reader()  # growing the map needs no open transaction
                grown = self._grown_map_size()
                self._reserve(grown)
                self.env.set_mapsize(grown)
                continue
            except BaseException:
                txn.abort()
                raise
            self._drop_reader()
            return result

    def _reserve(self, size: int) -> None:
        """Allocate every block of data.mdb below ``size`` (``posix_fallocate``; data is kept), so
        that no write through the writable map can hit a hole on a full filesystem. `StoreFull`
        when the filesystem has no room for it."""
        data_mdb = os.path.join(self._key, "data.mdb")
        try:
            fd = os.open(data_mdb, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(
                    f"no room for {size} bytes of metadata in {data_mdb}: {exc.strerror}"
                ) from exc
            raise StoreError(f"cannot allocate {data_mdb}: {exc.strerror}") from exc

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
        info = self.env.info()
        stat = self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])

    def sync(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise StoreError(f"syncing metadata: {exc}") from exc

    def close(self) -> None:
        if _OPEN.get(self._key) is self:
            del _OPEN[self._key]
        self._drop_reader()
        self.env.close()
