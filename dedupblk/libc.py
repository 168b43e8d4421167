"""The C library, loaded once for every ctypes call the project makes.

``ctypes.CDLL(None, use_errno=True)``: calls release the GIL (a thread blocked in
``io_uring_enter`` does not stop the others) and save ``errno`` for `os_error`.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)


def function(name: str, restype: Any, *argtypes: Any) -> Any:
    """The libc function ``name`` with its result and argument types declared."""
    found = getattr(libc, name)
    found.restype = restype
    found.argtypes = list(argtypes)
    return found


def os_error(what: str) -> OSError:
    """An OSError for the errno the last libc call left, its message prefixed with ``what``."""
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")
