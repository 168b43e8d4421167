"""One test per named invariant: break exactly it on disk by flipping bits, assert `check` finds
it, repair, assert a second check is clean and the surviving data reads back; and a repair never
makes damaged data good: such pages read as EIO, named by device byte range."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.errors import DataLost, FormatError
from dedupblk.store import check_store, create_store, open_store
from dedupblk.store.format import (
    CONFIG,
    FILL_ENTRY,
    FILL_KEY,
    KEY_STATE,
    MAP_CHUNK_PAGES,
    STATE,
    map_key,
)
from tests.conftest import REPO, rand_page

P = 4096
SHARED, UNIQUE = rand_page(1), rand_page(2)
LAYOUT = [SHARED, SHARED, SHARED, UNIQUE, b"\x5a" * P]  # pages 0-4; slot 1 SHARED, slot 2 UNIQUE
DBS = (b"info", b"map", b"fills", b"refs", b"fps", b"index")


def _populated(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    create_store(path, 1 << 20)
    with open_store(path) as store:
        store.write(0, b"".join(LAYOUT))
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
    dbs = {name: env.open_db(name) for name in DBS}
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
        txn.put(key, _flip(value, 1, 2), db=dbs[b"refs"])  # slot 1's refcount: 3 -> 7

    _edit(path, body)


def break_fingerprints(path: str) -> None:
    """The stored word of slot 2 (UNIQUE) no longer matches its data."""

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, value = _first(txn, dbs[b"fps"])
        txn.put(key, _flip(value, 2 * 4, 3), db=dbs[b"fps"])

    _edit(path, body)


def break_index(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key, value = _first(txn, dbs[b"index"])
        txn.put(key, _flip(value, 0, 0), db=dbs[b"index"])  # the first entry's tag

    _edit(path, body)


def break_bounds(path: str) -> None:
    """Page 4's entry (the fill) names a slot far beyond the backend instead."""

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        key = map_key(0)
        chunk = bytearray(txn.get(key, db=dbs[b"map"]))
        assert chunk[16:20] == FILL_ENTRY.to_bytes(4, "little")
        chunk[16:20] = _flip(bytes(4), 2, 6)  # slot 0x400000
        txn.put(key, bytes(chunk), db=dbs[b"map"])

    _edit(path, body)


def break_counters(path: str) -> None:
    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        raw = txn.get(KEY_STATE, db=dbs[b"info"])
        txn.put(KEY_STATE, _flip(raw, 0, 1), db=dbs[b"info"])  # mapped_pages
        assert STATE.unpack(raw)[0] != STATE.unpack(_flip(raw, 0, 1))[0]

    _edit(path, body)


def break_slot_data(path: str) -> None:
    """A bit flip in the unique page's slot: its fingerprint and index entry stop matching."""
    with open(os.path.join(path, "slots"), "r+b") as f:
        f.seek(2 * P + 100)  # slot 2 holds UNIQUE (slot 1 holds SHARED)
        byte = f.read(1)
        f.seek(2 * P + 100)
        f.write(bytes([byte[0] ^ 0x10]))


# name -> (breaker, checks that find it, pages lost by the repair)
BREAKERS: dict[str, tuple[Callable[[str], None], set[str], list[int]]] = {
    "refcounts": (break_refcounts, {"refcounts"}, []),
    "fingerprints": (break_fingerprints, {"fingerprints", "index"}, [3]),
    "index": (break_index, {"index"}, []),
    "bounds": (break_bounds, {"bounds", "counters"}, [4]),
    "counters": (break_counters, {"counters"}, []),
    "slot-data": (break_slot_data, {"fingerprints", "index"}, [3]),
}


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_check_finds_and_repairs(tmp_path: Path, name: str) -> None:
    path = _populated(tmp_path)
    breaker, expected, lost = BREAKERS[name]
    breaker(path)
    found = check_store(path)
    assert {p.check for p in found.problems} == expected
    repaired = check_store(path, repair=True)
    assert repaired.repaired
    assert repaired.lost == [(page * P, P) for page in lost]
    assert check_store(path).problems == []
    with open_store(path) as store:
        for page, content in enumerate(LAYOUT):
            if page in lost:
                with pytest.raises(DataLost):
                    store.read(page * P, P)
            else:
                assert store.read(page * P, P) == content
        store.write(20 * P, rand_page(9))  # the repaired store takes writes
        for page in lost:  # a lost page is good again once written
            store.write(page * P, rand_page(100 + page))
            assert store.read(page * P, P) == rand_page(100 + page)
        store.commit()
        assert store.statistics().lost_pages == 0
    assert check_store(path).problems == []


def test_repair_of_damaged_data_names_the_range_and_exits_with_data_lost(tmp_path: Path) -> None:
    path = _populated(tmp_path)
    break_slot_data(path)
    runner = CliRunner()
    checked = runner.invoke(main, ["check", path])
    assert checked.exit_code == 1
    assert (
        "bytes 12288-16383 (pages 3-3): the data does not match its fingerprint" in checked.stdout
    )
    assert "slot" not in checked.stdout.split("index")[0]  # damage is named by device range
    repaired = runner.invoke(main, ["check", path, "--repair"])
    assert repaired.exit_code == 3, repaired.output
    assert "data lost: bytes 12288-16383 (pages 3-3) now read as EIO" in repaired.stdout
    again = runner.invoke(main, ["check", path])
    assert again.exit_code == 0, again.output


def test_a_damaged_lmdb_file_is_one_line_and_an_exit_code(tmp_path: Path) -> None:
    path = _populated(tmp_path)
    data = Path(path, "meta", "data.mdb")
    raw = bytearray(data.read_bytes())
    hit = 0
    for page in range(2, len(raw) // P):  # every page holding the format record (info's leaf)
        if b"DEDUPBLK" in raw[page * P : (page + 1) * P]:
            raw[page * P + 10] ^= 0x7F  # its page flags (LMDB 0.9 header: pgno, pad, flags)
            hit += 1
    assert hit
    data.write_bytes(bytes(raw))
    for command in (["check", path], ["check", path, "--repair"], ["info", path], ["stats", path]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code not in (0, None), (command, result.output)
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        ), (command, result.exception)
        assert len(result.stderr.strip().splitlines()) <= 1, (command, result.stderr)


def test_config_record_is_what_the_spec_says(tmp_path: Path) -> None:
    path = _populated(tmp_path)
    env = lmdb.open(os.path.join(path, "meta"), max_dbs=8, readonly=True)
    with env.begin() as txn:
        raw = txn.get(b"config", db=env.open_db(b"info", txn=txn, create=False))
        chunk = txn.get(map_key(0), db=env.open_db(b"map", txn=txn, create=False))
    env.close()
    size, page_size = CONFIG.unpack_from(raw)[:2]
    assert (size, page_size) == (1 << 20, P)
    assert len(chunk) == MAP_CHUNK_PAGES * 4
    entries = [int.from_bytes(chunk[i * 4 : i * 4 + 4], "little") for i in range(6)]
    assert entries == [1, 1, 1, 2, FILL_ENTRY, 0]


def test_single_bit_flips_in_the_metadata_are_one_line_for_every_command(tmp_path: Path) -> None:
    """Bits flipped at random in the pages LMDB uses: whatever each command makes of it, it
    answers with an exit code and at most one line, never a traceback nor a signal."""
    source = str(tmp_path / "source")
    create_store(source, 4 << 20)
    rng = random.Random(1)
    with open_store(source) as store:
        for page in range(0, 900, 3):
            store.write(page * P, rng.randbytes(P) if page % 2 else b"\x07" * P)
        store.flush()
    used = os.path.getsize(os.path.join(source, "meta", "data.mdb"))
    with open_store(source, readonly=True) as store:
        used = min(used, store.statistics().metadata_bytes)
    for n in range(10):
        path = str(tmp_path / f"s{n}")
        shutil.copytree(source, path)
        with open(os.path.join(path, "meta", "data.mdb"), "r+b") as f:
            at = rng.randrange(2 * P, used)  # past LMDB's two meta pages
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 1 << rng.randrange(8)]))
        for command in (["check", path], ["dump", path, "0", str(4 << 20)], ["stats", path]):
            done = subprocess.run([sys.executable, "-m", "dedupblk.cli", *command], cwd=REPO,
                                  capture_output=True, check=False)  # fmt: skip
            err = done.stderr.decode(errors="replace")
            assert done.returncode >= 0, (at, command, done.returncode)
            assert "Traceback" not in err and err.count("\n") <= 1, (at, command, err)


def _repaired_clean(path: str) -> list[tuple[int, int]]:
    """Check finds the damage in bounds; repair; a second check is clean; return the lost ranges."""
    assert {p.check for p in check_store(path).problems} == {"bounds"}
    lost = check_store(path, repair=True).lost
    assert check_store(path).problems == []
    return lost


def _with_a_short_map_chunk(tmp_path: Path) -> tuple[str, list[bytes]]:
    """A store of 10 pages whose map record lost its last entry, and the pages."""
    path = str(tmp_path / "store")
    create_store(path, 4 << 20)
    pages = [rand_page(n) for n in range(10)]
    with open_store(path) as store:
        store.write(0, b"".join(pages))

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        txn.put(map_key(0), txn.get(map_key(0), db=dbs[b"map"])[:-4], db=dbs[b"map"])

    _edit(path, body)
    return path, pages


def test_repair_keeps_what_a_short_map_chunk_still_holds(tmp_path: Path) -> None:
    """A map record that lost its last entry: the pages it still names keep their data, and
    the one it lost reads as EIO (what it held cannot be known)."""
    path, pages = _with_a_short_map_chunk(tmp_path)
    last = MAP_CHUNK_PAGES - 1
    assert _repaired_clean(path) == [(last * P, P)]
    with open_store(path, readonly=True) as store:
        assert [store.read(n * P, P) for n in range(10)] == pages
        with pytest.raises(DataLost):
            store.read(last * P, P)


def test_a_read_a_short_map_chunk_cannot_answer_is_one_line_naming_the_damage(
    tmp_path: Path,
) -> None:
    """Before any repair: reading a page past the end of a short map record is one
    `FormatError` (one page or several), and ``dump`` says so in one line."""
    path, pages = _with_a_short_map_chunk(tmp_path)
    last = MAP_CHUNK_PAGES - 1
    with open_store(path, readonly=True) as store:
        assert store.read(0, 10 * P) == b"".join(pages)
        for offset, length in ((last * P, P), ((last - 1) * P, 2 * P)):
            with pytest.raises(FormatError, match="the metadata is damaged"):
                store.read(offset, length)
    done = subprocess.run([sys.executable, "-m", "dedupblk.cli", "dump", path, str(last * P),
                           str(P)], cwd=REPO, capture_output=True, check=False)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == FormatError.exit_code
    assert "metadata is damaged" in err and err.count("\n") == 1 and "Traceback" not in err


def test_repair_deletes_a_record_of_another_volume_and_keeps_the_page(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    create_store(path, 4 << 20)
    fill = (0x1122334455667788).to_bytes(8, "little") * 512
    with open_store(path) as store:
        store.write(5 * P, fill)

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        txn.put(FILL_KEY.pack(1, 5), (7).to_bytes(8, "little"), db=dbs[b"fills"])

    _edit(path, body)
    assert _repaired_clean(path) == []
    with open_store(path, readonly=True) as store:
        assert store.read(5 * P, P) == fill


def test_repair_clears_entries_past_the_end_of_the_device(tmp_path: Path) -> None:
    """The device's last map chunk is longer than the device: an entry past the end is cleared,
    and the slot's refcount follows, while the page within the device keeps its data."""
    path = str(tmp_path / "store")
    create_store(path, 4 << 20)  # 1024 pages: chunk 1 holds pages 1020-2039
    page = rand_page(7)
    with open_store(path) as store:
        store.write(1021 * P, page)

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        chunk = bytearray(txn.get(map_key(1), db=dbs[b"map"]))
        chunk[(1030 - 1020) * 4 : (1031 - 1020) * 4] = chunk[4:8]  # page 1030 shares its slot
        txn.put(map_key(1), bytes(chunk), db=dbs[b"map"])

    _edit(path, body)
    assert _repaired_clean(path) == []
    with open_store(path, readonly=True) as store:
        assert store.read(1021 * P, P) == page
        assert store.statistics().mapped_pages == 1


def test_a_partial_trim_of_a_lost_page_leaves_it_lost_and_a_whole_one_frees_it(
    tmp_path: Path,
) -> None:
    """A trim is advisory: over part of a page that reads as EIO it does nothing (the rest of
    the page cannot be known), where a write of zeroes must fail; a trim of the whole page makes
    it zeros again."""
    path = _populated(tmp_path)
    break_slot_data(path)
    assert check_store(path, repair=True).lost == [(3 * P, P)]
    with open_store(path) as store:
        store.trim(3 * P + 512, 1024)
        with pytest.raises(DataLost):
            store.read(3 * P, P)
        with pytest.raises(DataLost):
            store.write_zeroes(3 * P + 512, 1024)
        store.trim(2 * P, 2 * P)  # page 2 whole, page 3 whole
        assert store.read(2 * P, 2 * P) == bytes(2 * P)
        assert store.read(0, P) == SHARED
    assert check_store(path).problems == []


@pytest.mark.parametrize("record", [b"config", KEY_STATE])
def test_an_undecodable_header_record_is_one_line_for_every_command(
    tmp_path: Path, record: bytes
) -> None:
    """A header record of the wrong length (LMDB itself intact): every command says the
    metadata is damaged in one line, never a `struct.error` traceback."""
    path = _populated(tmp_path)

    def body(txn: Any, dbs: dict[bytes, Any]) -> None:
        value = txn.get(record, db=dbs[b"info"])
        txn.put(record, value[:-3], db=dbs[b"info"])

    _edit(path, body)
    for command in (["check", path], ["check", path, "--repair"], ["info", path],
                    ["stats", path], ["dump", path, "0", str(P)]):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "dedupblk.cli", *command], cwd=REPO,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode not in (0, None) and done.returncode > 0, (command, done)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert done.stderr.count("\n") == 1, (command, done.stderr)
        assert "damaged" in done.stderr or "undecodable" in done.stderr, (command, done.stderr)


def test_a_damaged_lmdb_page_is_exit_status_4_and_repair_changes_nothing(tmp_path: Path) -> None:
    """The page type of each page LMDB uses, broken in turn: a store that still opens is found
    damaged by the structure check (exit 4: no repair can rebuild from such a file), and
    ``--repair`` then writes nothing."""
    source = _populated(tmp_path)
    data = os.path.join(source, "meta", "data.mdb")
    with open_store(source, readonly=True) as store:
        used = min(os.path.getsize(data), store.statistics().metadata_bytes) // P
    seen = set()
    for page in range(2, used):  # past LMDB's two meta pages
        path = str(tmp_path / f"p{page}")
        shutil.copytree(source, path)
        damaged = os.path.join(path, "meta", "data.mdb")
        with open(damaged, "r+b") as f:
            f.seek(page * P + 10)  # the page flags (LMDB 0.9 page header: pgno, pad, flags)
            flags = f.read(1)[0]
            f.seek(page * P + 10)
            f.write(bytes([flags ^ 0x7F]))
        checked = CliRunner().invoke(main, ["check", path])
        seen.add(checked.exit_code)
        assert checked.exit_code in (0, 1, 4), (page, checked.output)  # 0: a free page
        if checked.exit_code == 4:
            assert "the metadata file itself is damaged" in checked.stdout
            before = Path(damaged).read_bytes()
            repaired = CliRunner().invoke(main, ["check", path, "--repair"])
            assert repaired.exit_code == 4, (page, repaired.output)
            assert Path(damaged).read_bytes() == before
        shutil.rmtree(path)
    assert 4 in seen
