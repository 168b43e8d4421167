"""The dedup store: pages of a block device mapped to refcounted, deduplicated slots.

Pure core: imports nothing from nbdkit, io_uring, click or any frontend. The on-disk format is
specified in `dedupblk.store.format`.
"""

from .check import CheckResult, Problem, check_store
from .errors import (
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
from .format import PAGE_SIZE, Config
from .store import (
    Statistics,
    Store,
    create_store,
    open_store,
    parse_size,
    read_statistics,
)

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
    "check_store",
    "create_store",
    "open_store",
    "parse_size",
    "read_statistics",
]
