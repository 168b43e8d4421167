"""One test per named invariant: break exactly it on disk by flipping bits, assert `check` finds
it, repair, assert a second check is clean and the surviving data reads back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest

from dedupblk.store import check_store, create_store, open_store
from dedupblk.store.format import CONFIG, KEY_STATE, STATE
from tests.conftest import rand_page

P = 4096
SHARED, UNIQUE = rand_page(1), rand_page(2)


def _populated(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    create_store(path, 1 << 20)
    with open_store(path) as store:
        store.write(0, SHARED * 3 + UNIQUE + b"\x5a" * P)
        store.write(10 * P, rand_page(3))
        store.flush()
        store.trim(10 * P, P)  # one slot goes free
        store.flush()
    assert check_store(path).problems == []
    return path


def _flip(raw: bytes, byte: int, bit: int = 0) -> bytes:
    out = bytearray(raw)
    out[byte] ^= 1 << bit
    return bytes(out)


def _edit(path: str, body: Callable[[Any, dict[bytes, Any]], None]) -> None:
    env = lmdb.open(os.path.join(path, "meta"), max_dbs=8)
    dbs = {name: env.open_db(name) for name in (b"info", b"map", b"refs", b"index", b"free")}
    with env.begin(write=True) as txn:
        body(txn, dbs)
    env.close()


def _first(txn: Any, db: Any) -> tuple[bytes, bytes]:
    cursor = txn.cursor(db=db)
    assert cursor.first()
    return cursor.key(), cursor.value()


def break_refcounts(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, value = _first(txn, dbs[b"refs"])
        txn.put(key, _flip(value, 0, 2), db=dbs[b"refs"])

    _edit(path, body)


def break_free_live(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, _ = _first(txn, dbs[b"refs"])
        txn.put(key, b"", db=dbs[b"free"])

    _edit(path, body)


def break_leaks(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, _ = _first(txn, dbs[b"free"])
        txn.delete(key, db=dbs[b"free"])

    _edit(path, body)


def break_fingerprints(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, value = _first(txn, dbs[b"refs"])
        txn.put(key, _flip(value, 9, 5), db=dbs[b"refs"])

    _edit(path, body)


def break_index(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, value = _first(txn, dbs[b"index"])
        txn.put(key, _flip(value, 0, 0), db=dbs[b"index"])  # names a neighbouring slot

    _edit(path, body)


def break_bounds(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        cursor = txn.cursor(db=dbs[b"map"])
        for key, value in cursor:
            if value[0] == 2:  # the same-filled page: moving it keeps every count right
                txn.delete(key, db=dbs[b"map"])
                txn.put(_flip(key, 0, 6), value, db=dbs[b"map"])  # a page far beyond the end
                return
        raise AssertionError("no fill mapping")

    _edit(path, body)


def break_counters(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        raw = txn.get(KEY_STATE, db=dbs[b"info"])
        txn.put(KEY_STATE, _flip(raw, 8, 1), db=dbs[b"info"])  # mapped_pages
        assert STATE.unpack(raw)[1] != STATE.unpack(_flip(raw, 8, 1))[1]

    _edit(path, body)


def break_slot_data(path: str) -> None:
    """A bit flip in the unique page's slot: its fingerprint and index entry both stop matching."""
    with open(os.path.join(path, "slots"), "r+b") as f:
        f.seek(2 * P + 100)  # slot 2 holds UNIQUE (slot 1 holds SHARED)
        byte = f.read(1)
        f.seek(2 * P + 100)
        f.write(bytes([byte[0] ^ 0x10]))


BREAKERS = {
    "refcounts": (break_refcounts, {"refcounts"}),
    "free-live": (break_free_live, {"free-live"}),
    "leaks": (break_leaks, {"leaks"}),
    "fingerprints": (break_fingerprints, {"fingerprints"}),
    "index": (break_index, {"index"}),
    "bounds": (break_bounds, {"bounds"}),
    "counters": (break_counters, {"counters"}),
    "slot-data": (break_slot_data, {"fingerprints", "index"}),
}


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_check_finds_and_repairs(tmp_path: Path, name: str) -> None:
    path = _populated(tmp_path)
    breaker, expected = BREAKERS[name]
    breaker(path)
    found = check_store(path)
    assert {p.check for p in found.problems} == expected
    repaired = check_store(path, repair=True)
    assert repaired.repaired
    assert check_store(path).problems == []
    with open_store(path) as store:
        assert store.read(0, P) == SHARED
        assert store.read(4 * P, P) == b"\x5a" * P or name == "bounds"
        store.write(20 * P, rand_page(9))  # the repaired store takes writes
    assert check_store(path).problems == []


def test_config_record_is_what_the_spec_says(tmp_path: Path) -> None:
    path = _populated(tmp_path)
    env = lmdb.open(os.path.join(path, "meta"), max_dbs=8, readonly=True)
    with env.begin() as txn:
        raw = txn.get(b"config", db=env.open_db(b"info", txn=txn, create=False))
    env.close()
    size, page_size = CONFIG.unpack_from(raw)[:2]
    assert (size, page_size) == (1 << 20, P)
