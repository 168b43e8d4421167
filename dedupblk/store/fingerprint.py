"""Page fingerprints and page classification (see `dedupblk.store.format`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import xxhash

from .format import PAGE_SIZE, Fingerprint

FingerprintFn = Callable[[bytes], Fingerprint]

ZERO_PAGE = bytes(PAGE_SIZE)
WORDS_PER_PAGE = PAGE_SIZE // 8

# What a full page is: the three outcomes of `classify`.
ZERO = 0
FILL = 1
DATA = 2


# XXH3-128 digest of a page: the store's only fingerprint algorithm (id 1). The C function itself,
# not a wrapper around it: it runs for every page written.
xxh3_128 = cast(FingerprintFn, xxhash.xxh3_128_digest)


def classify(page: bytes) -> tuple[int, int]:
    """(ZERO, 0), (FILL, word) for one non-zero 8-byte word repeated, or (DATA, 0)."""
    if page == ZERO_PAGE:
        return ZERO, 0
    head = page[:8]
    if page[-8:] == head and page == head * WORDS_PER_PAGE:
        return FILL, int.from_bytes(head, "little")
    return DATA, 0


def fill_page(word: int) -> bytes:
    """The page a FILL map entry stands for."""
    return word.to_bytes(8, "little") * WORDS_PER_PAGE
