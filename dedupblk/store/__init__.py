"""The dedup store: pages of a block device mapped to refcounted, deduplicated slots.

Pure core: imports nothing from nbdkit, io_uring, click or any frontend. The on-disk format is
specified in `dedupblk.store.format`; the modules, each importing only those before it:
`format`, `fingerprint`, `meta` (LMDB), `backend` (slots), `lock`, `create`, `batch` (one
commit), `stats`, `check` (named invariants), `store` (the `Store` API).
"""

from ..errors import (
    BackendError,
    BackendMismatch,
    FormatError,
    InvalidRequest,
    NotAStore,
    ReadOnlyStore,
    StoreError,
    StoreExists,
    StoreFull,
    StoreLocked,
)
from .check import CheckResult, Problem
from .create import create_store
from .format import PAGE_SIZE, Config
from .stats import Statistics, read_statistics
from .store import Store, StoreObserver, check_store, open_store

__all__ = [
    "PAGE_SIZE",
    "BackendError",
    "BackendMismatch",
    "CheckResult",
    "Config",
    "FormatError",
    "InvalidRequest",
    "NotAStore",
    "Problem",
    "ReadOnlyStore",
    "Statistics",
    "Store",
    "StoreError",
    "StoreExists",
    "StoreFull",
    "StoreLocked",
    "StoreObserver",
    "check_store",
    "create_store",
    "open_store",
    "read_statistics",
]
