"""A store's usage: `Statistics`, read from the last commit (works while another process serves
the store: LMDB readers see the last committed state).

One definition of the savings, used everywhere: the *logical* bytes are the device's pages that
are not zeros (each stored in a slot or kept inline as a fill); the *stored* bytes are the slots
in use. ``saved_bytes`` is logical minus stored, ``saving_percent`` is that share of the logical
bytes, and ``dedup_ratio`` is logical over stored (None while nothing is stored). Zero pages take
nothing and count in neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NotAStore
from .format import PAGE_SIZE, Config, State
from .meta import Meta, damaged_metadata


@dataclass(frozen=True)
class Statistics:
    """A consistent snapshot of a store's usage (the JSON keys of ``dedupblk stats``)."""

    size_bytes: int
    capacity_bytes: int  # data slots of the backend
    mapped_pages: int  # pages stored in slots
    same_filled_pages: int  # pages kept inline as one repeated 8-byte word
    zero_pages: int  # pages that read as zeros and take nothing
    lost_pages: int  # pages that read as EIO since a repair found their data damaged
    stored_pages: int  # slots in use
    free_slots: int
    index_entries: int
    logical_bytes: int
    stored_bytes: int
    saved_bytes: int
    saving_percent: float
    dedup_ratio: float | None
    used_percent: float
    metadata_bytes: int


def statistics_of(meta: Meta, config: Config, state: State) -> Statistics:
    logical = (state.mapped_pages + state.same_filled_pages) * PAGE_SIZE
    stored = state.stored_slots * PAGE_SIZE
    capacity = (config.slot_capacity - 1) * PAGE_SIZE
    return Statistics(
        size_bytes=config.size,
        capacity_bytes=capacity,
        mapped_pages=state.mapped_pages,
        same_filled_pages=state.same_filled_pages,
        zero_pages=config.pages - state.mapped_pages - state.same_filled_pages - state.lost_pages,
        lost_pages=state.lost_pages,
        stored_pages=state.stored_slots,
        free_slots=config.slot_capacity - 1 - state.stored_slots,
        index_entries=state.index_entries,
        logical_bytes=logical,
        stored_bytes=stored,
        saved_bytes=logical - stored,
        saving_percent=100.0 * (logical - stored) / logical if logical else 0.0,
        dedup_ratio=logical / stored if stored else None,
        used_percent=100.0 * stored / capacity if capacity else 0.0,
        metadata_bytes=meta.used_bytes(),
    )


def read_statistics(path: str | os.PathLike[str]) -> tuple[Config, Statistics]:
    """Statistics as of the last commit, without taking the store's lock: works while another
    process serves the store (LMDB readers see the last committed state)."""
    store_dir = os.fspath(path)
    if not os.path.isdir(store_dir):
        raise NotAStore(f"{store_dir}: no such store")
    opened = Meta.opened(store_dir)
    if opened is not None:  # LMDB allows one environment per file per process
        config, state = opened.read_header()
        return config, statistics_of(opened, config, state)
    meta = Meta(store_dir, readonly=True)
    try:
        with damaged_metadata(store_dir):
            config, state = meta.read_header()
            return config, statistics_of(meta, config, state)
    finally:
        meta.close()
