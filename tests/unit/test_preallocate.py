"""``create --preallocate``: every block of the store's files written before serving, slots never
punched, LMDB's map kept within the preallocated metadata (see "Preallocated stores" in
dedupblk/store/format.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.store import InvalidRequest, create_store, open_store
from dedupblk.store import create as create_module
from dedupblk.store.backend import fill_holes
from dedupblk.store.create import default_meta_size
from dedupblk.store.format import BACKEND_HEADER, BACKEND_PREALLOCATED, DATA_FILE
from dedupblk.store.meta import INITIAL_MAP_SIZE, Meta
from tests.conftest import SMALL, allocated_bytes, rand_page

P = 4096
MIB = 1 << 20


def holes(path: str) -> list[tuple[int, int]]:
    """(start, end) of every hole of a file, by SEEK_HOLE/SEEK_DATA."""
    found: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = size
            found.append((hole, data))
            offset = data
    finally:
        os.close(fd)
    return found


def fully_written(path: str) -> bool:
    return not holes(path) and allocated_bytes(path) >= os.path.getsize(path)


@pytest.fixture
def prealloc_dir(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    create_store(path, SMALL, preallocate=True)
    return path


def test_every_file_is_written_in_full(prealloc_dir: str) -> None:
    slots = os.path.join(prealloc_dir, DATA_FILE)
    data_mdb = os.path.join(prealloc_dir, "meta", "data.mdb")
    assert os.path.getsize(slots) == P + SMALL + SMALL // 4
    assert os.path.getsize(data_mdb) == default_meta_size(SMALL) == MIB
    for path in (slots, data_mdb, os.path.join(prealloc_dir, "meta", "lock.mdb")):
        assert fully_written(path), holes(path)
    with open(slots, "rb") as raw:
        header = BACKEND_HEADER.unpack(raw.read(BACKEND_HEADER.size))
    assert header[3] == BACKEND_PREALLOCATED


def test_a_plain_store_stays_sparse_and_flagless(store_dir: str) -> None:
    slots = os.path.join(store_dir, DATA_FILE)
    assert holes(slots)
    with open(slots, "rb") as raw:
        assert BACKEND_HEADER.unpack(raw.read(BACKEND_HEADER.size))[3] == 0
    with open_store(store_dir) as store:
        assert store._backend.punches
        assert not store._backend.direct
        assert Meta.opened(store_dir) is not None
        assert store._meta.preallocated == 0


def test_freed_slots_are_reused_not_punched(prealloc_dir: str) -> None:
    slots = os.path.join(prealloc_dir, DATA_FILE)
    before = allocated_bytes(slots)
    with open_store(prealloc_dir) as store:
        assert not store._backend.punches
        assert store._backend.direct  # O_DIRECT through the bounce buffer
        first = b"".join(rand_page(i) for i in range(64))
        store.write(0, first)
        store.flush()
        store.trim(0, 64 * P)
        store.flush()
        assert store.statistics().stored_pages == 0
        assert allocated_bytes(slots) == before
        store.write(0, b"".join(rand_page(100 + i) for i in range(64)))
        store.flush()
        with open(slots, "rb") as f:  # nothing was punched: the old pages are still there
            assert first[:P] in f.read()
        assert store.read(0, 64 * P) == b"".join(rand_page(100 + i) for i in range(64))
        assert store.check().problems == []
    assert fully_written(slots)
    assert allocated_bytes(slots) == before


def test_map_stays_within_the_preallocated_metadata(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    create_store(path, 64 * MIB, preallocate=True, meta_size=2 * MIB)
    data_mdb = os.path.join(path, "meta", "data.mdb")
    with open_store(path) as store:
        assert store._meta.preallocated == 2 * MIB
        assert store._meta.env.info()["map_size"] == 2 * MIB != INITIAL_MAP_SIZE
        store.write(0, b"".join(rand_page(i) for i in range(512)))
        store.flush()
    assert os.path.getsize(data_mdb) == 2 * MIB
    assert fully_written(data_mdb)


def test_metadata_outgrowing_its_preallocation_warns_and_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "store")
    monkeypatch.setattr(create_module, "META_PREALLOC_MIN", 16 * P)  # outgrown by a few MiB
    create_store(path, 64 * MIB, preallocate=True, meta_size=16 * P)
    pages = b"".join(rand_page(i) for i in range(8192))
    with caplog.at_level(logging.WARNING, logger="dedupblk.store.meta"), open_store(path) as store:
        store.write(0, pages)
        store.flush()
        assert store.read(0, len(pages)) == pages
        assert store.check().problems == []
    assert "outgrew its preallocated 65536 bytes" in caplog.text
    assert os.path.getsize(os.path.join(path, "meta", "data.mdb")) > 16 * P


def test_meta_size_needs_preallocate_and_whole_pages(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="only given with preallocation"):
        create_store(str(tmp_path / "a"), SMALL, meta_size=2 * MIB)
    with pytest.raises(InvalidRequest, match="bad metadata size"):
        create_store(str(tmp_path / "b"), SMALL, preallocate=True, meta_size=2 * MIB + 1)
    with pytest.raises(InvalidRequest, match="bad metadata size"):
        create_store(str(tmp_path / "c"), SMALL, preallocate=True, meta_size=P)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_default_meta_size_is_48_bytes_a_page_in_whole_mib() -> None:
    assert default_meta_size(P) == MIB
    assert default_meta_size(1 << 30) == 12 * MIB
    assert default_meta_size((1 << 30) + 4 * P) == 13 * MIB


def test_fill_holes_keeps_data_and_extends(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 * MIB)
        os.pwrite(fd, b"x" * P, 3 * MIB)
        os.pwrite(fd, b"y" * P, 8 * MIB - P)
        fill_holes(fd, 10 * MIB, path)
    finally:
        os.close(fd)
    content = Path(path).read_bytes()
    assert len(content) == 10 * MIB
    assert content[3 * MIB : 3 * MIB + P] == b"x" * P
    assert content[8 * MIB - P : 8 * MIB] == b"y" * P
    assert content.count(0) == 10 * MIB - 2 * P
    assert fully_written(path)


def test_cli_create_preallocate(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    runner = CliRunner()
    result = runner.invoke(main, ["create", store, "--size", "1M", "--preallocate",
                                  "--meta-size", "2M"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "preallocated" in result.stdout
    assert os.path.getsize(os.path.join(store, "meta", "data.mdb")) == 2 * MIB
    result = runner.invoke(main, ["create", str(tmp_path / "t"), "--size", "1M", "--meta-size",
                                  "2M"])  # fmt: skip
    assert result.exit_code != 0
    assert "only given with preallocation" in result.stderr
