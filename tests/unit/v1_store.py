"""A format-version-1 store, written record by record as version 1 specified it (the records are
`dedupblk.store.v1`), so that the upgrade is tested against stores no current code can make."""

from __future__ import annotations

import os
import uuid as uuidlib

import lmdb
import xxhash

from dedupblk.store import v1
from dedupblk.store.format import BACKEND_HEADER, BACKEND_MAGIC, FORMAT, FORMAT_MAGIC

P = 4096


def _fill_word(page: bytes) -> int | None:
    word = page[:8]
    if word != bytes(8) and word * (P // 8) == page:
        return int.from_bytes(word, "little")
    return None


def make_v1_store(
    path: str,
    size: int,
    pages: dict[int, bytes],
    *,
    max_index_entries: int = 0,
    max_share: int = 254,
    deferred: tuple[int, ...] = (),
    clean: int = 1,
) -> dict[int, bytes]:
    """Write a version-1 store at ``path`` holding ``pages`` (page number -> 4096 bytes); zero
    pages are left unmapped, fills inline, data deduplicated. ``deferred`` adds dead slots
    holding junk, as a killed version-1 writer left them. Returns what every page must read."""
    os.makedirs(os.path.join(path, "meta"), mode=0o700)
    store_uuid = uuidlib.uuid4().bytes
    slots: dict[bytes, int] = {}
    data: dict[int, bytes] = {}
    refs: dict[int, int] = {}
    mapping: dict[int, tuple[int, int]] = {}
    for page, content in sorted(pages.items()):
        if content == bytes(P):
            continue
        word = _fill_word(content)
        if word is not None:
            mapping[page] = (v1.KIND_FILL, word)
            continue
        slot = slots.get(content)
        if slot is None or refs[slot] >= max_share:
            slot = slots[content] = len(data) + 1
            data[slot] = content
            refs[slot] = 0
        refs[slot] += 1
        mapping[page] = (v1.KIND_SLOT, slot)
    slot_high = len(data) + 1
    for n, dead in enumerate(deferred):
        data[dead] = bytes([n + 1]) * 7 + b"\x02" + bytes(P - 8)
        slot_high = max(slot_high, dead + 1)
    capacity = P + size + (size // 4) // P * P
    with open(os.path.join(path, "slots"), "wb") as f:
        f.truncate(capacity)
        header = BACKEND_HEADER.pack(BACKEND_MAGIC, 1, store_uuid, 0)
        f.write(header)
        for slot, content in data.items():
            f.seek(slot * P)
            f.write(content)
    env = lmdb.open(os.path.join(path, "meta"), max_dbs=8, map_size=64 << 20)
    dbs = {name: env.open_db(name) for name in v1.DB_NAMES}
    with env.begin(write=True) as txn:
        info = dbs[b"info"]
        txn.put(b"format", FORMAT.pack(FORMAT_MAGIC, v1.VERSION), db=info)
        config = v1.CONFIG.pack(size, P, capacity // P, max_index_entries, max_share, 1, store_uuid)
        txn.put(b"config", config, db=info)
        fills = sum(1 for kind, _ in mapping.values() if kind == v1.KIND_FILL)
        state = v1.STATE.pack(slot_high, len(mapping) - fills, fills, len(slots), clean)
        assert len(refs) == len({s for k, s in mapping.values() if k == v1.KIND_SLOT})
        txn.put(b"state", state, db=info)
        for page, (kind, value) in mapping.items():
            txn.put(v1.U64BE.pack(page), v1.MAP_ENTRY.pack(kind, value), db=dbs[b"map"])
        for slot, count in refs.items():
            fp = xxhash.xxh3_128_digest(data[slot])
            txn.put(v1.U64BE.pack(slot), v1.REF.pack(count, fp), db=dbs[b"refs"])
        for seq, (content, slot) in enumerate(slots.items()):
            fp = xxhash.xxh3_128_digest(content)
            txn.put(fp, v1.INDEX_ENTRY.pack(slot, seq), db=dbs[b"index"])
            if max_index_entries:
                txn.put(v1.U64BE.pack(seq), fp, db=dbs[b"age"])
        for slot in deferred:
            txn.put(v1.U64BE.pack(slot), b"", db=dbs[b"deferred"])
        for slot in range(1, slot_high):
            if slot not in refs and slot not in deferred:
                txn.put(v1.U64BE.pack(slot), b"", db=dbs[b"free"])
    env.sync(True)
    env.close()
    with open(os.path.join(path, "lock"), "w"):
        pass
    return {page: pages.get(page, bytes(P)) for page in range(size // P)}
