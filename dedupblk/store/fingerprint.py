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


# A classified page: (kind, fill word, the page's bytes for DATA). The store keeps it as is, as
# the page's pending entry (`dedupblk.store.batch.Pending`), so a page is classified once.
Classified = tuple[int, int, bytes | None]
ZERO_CLASSIFIED: Classified = (ZERO, 0, None)


def classify(page: bytes) -> Classified:
    """(ZERO, 0, None); (FILL, word, None) for one non-zero 8-byte word repeated; or (DATA, 0,
    page)."""
    if page == ZERO_PAGE:
        return ZERO_CLASSIFIED
    head = page[:8]
    if page[-8:] == head and page == head * WORDS_PER_PAGE:
        return FILL, int.from_bytes(head, "little"), None
    return DATA, 0, page


def fill_page(word: int) -> bytes:
    """The page a FILL map entry stands for."""
    return word.to_bytes(8, "little") * WORDS_PER_PAGE
