"""A store's usage: `Statistics`, read from the last commit (works while another process serves
the store: LMDB readers see the last committed state)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NotAStore
from .format import Config, State
from .meta import Meta


@dataclass(frozen=True)
class Statistics:
    """A consistent snapshot of a store's usage (the JSON keys of ``dedupblk stats``)."""

    size_bytes: int
    page_size: int
    mapped_pages: int
    same_filled_pages: int
    stored_pages: int
    index_entries: int
    dedup_ratio: float
    saved_bytes: int
    data_bytes: int
    metadata_bytes: int


def statistics_of(meta: Meta, config: Config, state: State) -> Statistics:
    with meta.env.begin() as txn:
        stored = meta.entries(txn, meta.refs)
        index_entries = meta.entries(txn, meta.index)
    mapped = state.mapped_pages
    return Statistics(
        size_bytes=config.size,
        page_size=config.page_size,
        mapped_pages=mapped,
        same_filled_pages=state.same_filled_pages,
        stored_pages=stored,
        index_entries=index_entries,
        dedup_ratio=mapped / stored if stored else 1.0,
        saved_bytes=(mapped + state.same_filled_pages - stored) * config.page_size,
        data_bytes=stored * config.page_size,
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
        config, state = meta.read_header()
        return config, statistics_of(meta, config, state)
    finally:
        meta.close()
