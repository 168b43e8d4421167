"""One size grammar for the CLI and the nbdkit plugin: nbdkit's own.

``4096``, ``64K``, ``512M``, ``2G``, ``1T``, ``1P``, ``1E``; a ``B`` or ``iB`` after the unit is
allowed (``1GiB``); units are powers of 1024. A bare number is bytes.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import InvalidRequest

_SIZE: Final = re.compile(r"(\d+)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_SHIFTS: Final = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Bytes from a size in nbdkit's syntax; `InvalidRequest` for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest(f"bad size {text!r}: a number of bytes with an optional K/M/G/T/P/E")
    return int(match.group(1)) << _SHIFTS[match.group(2).lower()]


_UNITS: Final = (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def describe_size(size: int) -> str:
    """``size`` in the largest binary unit that divides it (``64 MiB``, ``4 GiB``), else bytes."""
    for unit, shift in _UNITS:
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"
