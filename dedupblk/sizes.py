"""One size grammar for the CLI and the nbdkit plugin: nbdkit's own.

``4096``, ``64K``, ``512M``, ``2G``, ``1T``, ``1P``, ``1E``; a ``B`` or ``iB`` after the unit is
allowed (``1GiB``); units are powers of 1024. A bare number is bytes. Sizes shown to people
(`format_size`) use the same powers of 1024, spelled KiB, MiB, GiB...
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


_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(nbytes: int) -> str:
    """``nbytes`` for people: ``512 B``, ``1020 KiB``, ``1.5 GiB`` (one decimal unless exact)."""
    shift = 0
    # The next unit once one decimal of this one would round up to 1024 (1048575 is 1.0 MiB).
    while shift < 60 and abs(nbytes) >= (1 << (shift + 10)) - (1 << shift) // 20:
        shift += 10
    if nbytes % (1 << shift) == 0:
        return f"{nbytes >> shift} {_UNITS[shift // 10]}"
    return f"{nbytes / (1 << shift):.1f} {_UNITS[shift // 10]}"
