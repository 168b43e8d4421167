"""Page semantics, accounting, errors and durability rules of the store API."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
import time
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.sizes import parse_size
from dedupblk.store import (
    BackendMismatch,
    FormatError,
    InvalidRequest,
    NotAStore,
    ReadOnlyStore,
    Store,
    StoreError,
    StoreExists,
    StoreFull,
    StoreLocked,
    check_store,
    create_store,
    open_store,
    read_statistics,
)
from dedupblk.store import backend as backend_module
from dedupblk.store import meta as meta_module
from dedupblk.store.fingerprint import xxh3_128
from dedupblk.store.format import FORMAT, KEY_FORMAT, Fingerprint
from dedupblk.store.store import GROUP_PAGES, GROUP_SECONDS
from tests.conftest import SMALL, allocated_bytes, rand_page

P = 4096


def test_zero_page_takes_no_slot(store: Store) -> None:
    store.write(0, bytes(P))
    store.commit()
    stats = store.statistics()
    assert (stats.mapped_pages, stats.same_filled_pages, stats.stored_pages) == (0, 0, 0)
    assert store.extents(0, 2 * P) == [(0, 2 * P, True)]


def test_same_filled_page_is_inline(store: Store) -> None:
    word = (0xDEADBEEF12345678).to_bytes(8, "little")
    store.write(P, word * 512)
    store.commit()
    stats = store.statistics()
    assert (stats.same_filled_pages, stats.stored_pages, stats.mapped_pages) == (1, 0, 0)
    assert store.read(P, P) == word * 512
    assert store.extents(0, 2 * P) == [(0, P, True), (P, P, False)]


def test_duplicates_share_one_slot(store: Store) -> None:
    page = rand_page(1)
    for n in range(10):
        store.write(n * P, page)
    store.write(20 * P, rand_page(2))
    store.commit()
    stats = store.statistics()
    assert (stats.mapped_pages, stats.stored_pages) == (11, 2)
    assert stats.dedup_ratio == pytest.approx(11 / 2)
    assert stats.saved_bytes == 9 * P
    assert stats.stored_bytes == 2 * P
    assert store.read(9 * P, P) == page


def test_rewriting_identical_content_changes_nothing(store: Store) -> None:
    page = rand_page(3)
    store.write(0, page)
    store.write(P, page)
    store.commit()
    before = store.statistics()
    store.write(0, page)
    store.commit()
    # No slot, reference or mapping changes. (The map record is rewritten with its own value:
    # LMDB may copy that page, so the metadata file's size is not compared.)
    after = store.statistics()
    assert dataclasses.replace(after, metadata_bytes=before.metadata_bytes) == before
    assert store.check().problems == []


def test_overwrite_drops_old_reference_and_frees_slot(store: Store) -> None:
    a, b = rand_page(4), rand_page(5)
    store.write(0, a)
    store.commit()
    store.write(0, b)
    store.commit()
    stats = store.statistics()
    assert (stats.mapped_pages, stats.stored_pages) == (1, 1)
    assert store.read(0, P) == b


def test_trim_frees_slots_and_punches_holes(store_dir: str) -> None:
    data_file = os.path.join(store_dir, "slots")
    with open_store(store_dir) as store:
        store.write(0, b"".join(rand_page(10 + n) for n in range(64)))
        store.flush()
        full = allocated_bytes(data_file)
        store.trim(0, 64 * P)
        store.flush()
    assert read_statistics(store_dir)[1].stored_pages == 0
    assert allocated_bytes(data_file) <= full - 60 * P


def test_partial_trim_zeroes_part_of_a_page(store: Store) -> None:
    page = rand_page(6)
    store.write(0, page)
    store.trim(100, 200)
    assert store.read(0, P) == page[:100] + bytes(200) + page[300:]
    store.write_zeroes(0, P)
    store.commit()
    assert store.statistics().stored_pages == 0


def test_unaligned_write_spanning_pages(store: Store) -> None:
    data = os.urandom(3 * P)
    store.write(1000, data)
    assert store.read(1000, 3 * P) == data
    assert store.read(0, 1000) == bytes(1000)
    assert store.read(1000 + 3 * P, 100) == bytes(100)


def test_memoryview_input_is_copied(store: Store) -> None:
    buf = bytearray(rand_page(7))
    store.write(0, memoryview(buf))
    expected = bytes(buf)
    buf[:] = bytes(P)
    assert store.read(0, P) == expected


def test_collision_is_kept_apart_by_verify(store_dir: str) -> None:
    def collide(_page: bytes) -> Fingerprint:
        return Fingerprint(b"\x00" * 16)

    a, b = rand_page(8), rand_page(9)
    with open_store(store_dir, fingerprint=collide) as store:
        store.write(0, a)
        store.commit()
        store.write(P, b)
        store.write(2 * P, a)
        store.commit()
        assert store.read(0, P) == a
        assert store.read(P, P) == b
        assert store.read(2 * P, P) == a
        assert store.statistics().stored_pages == 2  # a shared, b stored apart
    with open_store(store_dir, fingerprint=collide) as store:
        assert store.read(P, P) == b


def test_max_share_caps_references(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL, max_share=3)
    page = rand_page(11)
    with open_store(path) as store:
        for n in range(7):
            store.write(n * P, page)
        store.commit()
        assert store.statistics().stored_pages == 3  # 3 + 3 + 1
        assert all(store.read(n * P, P) == page for n in range(7))
    assert check_store(path).problems == []


def test_bounded_index_prunes_oldest_single_references(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL, max_index_entries=32)
    with open_store(path) as store:
        for n in range(100):
            store.write(n * P, rand_page(100 + n))
        store.commit()
        stats = store.statistics()
        assert stats.index_entries <= 32
        assert stats.stored_pages == 100
        # The newest content is still a dedup candidate; the oldest is not.
        store.write(200 * P, rand_page(199))
        store.write(201 * P, rand_page(100))
        store.commit()
        assert store.statistics().stored_pages == 101
        assert store.read(201 * P, P) == rand_page(100)
    assert check_store(path).problems == []


def test_full_backend_gives_enospc_and_keeps_data(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL, backend_size=9 * P)  # header + 8 slots
    with open_store(path) as store:
        for n in range(8):
            store.write(n * P, rand_page(n))
        with pytest.raises(StoreFull) as info:
            store.write(8 * P, rand_page(8))
        assert info.value.errno == errno.ENOSPC
        store.write(9 * P, rand_page(3))  # a duplicate still fits
        store.write(10 * P, b"\x07" * P)  # and so does a same-filled page
        assert [store.read(n * P, P) for n in range(8)] == [rand_page(n) for n in range(8)]
        store.trim(0, 2 * P)
        store.write(8 * P, rand_page(8))  # trimmed space is usable again
        store.write(11 * P, rand_page(11))
        assert store.read(8 * P, P) == rand_page(8)
    assert check_store(path).problems == []


def test_overwrites_without_flush_reuse_slots_after_forced_flush(tmp_path: Path) -> None:
    """Overwrites need a new slot while the old one is deferred; a full backend flushes."""
    path = str(tmp_path / "s")
    create_store(path, SMALL, backend_size=5 * P)
    with open_store(path) as store:
        for rnd in range(10):
            store.write(0, b"".join(rand_page(1000 * rnd + n) for n in range(4)))
        assert store.read(0, 4 * P) == b"".join(rand_page(9000 + n) for n in range(4))
    assert check_store(path).problems == []


def test_requests_outside_the_device_are_invalid(store: Store) -> None:
    for offset, length in ((SMALL, 1), (SMALL - P, 2 * P), (-1, 1)):
        with pytest.raises(InvalidRequest) as info:
            store.read(offset, length)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(InvalidRequest):
            store.write(offset, b"x" * max(length, 1))
    with pytest.raises(InvalidRequest):
        store.trim(SMALL - P, 2 * P)
    assert store.read(SMALL - 1, 1) == b"\x00"


def test_readonly_refuses_writes(store_dir: str) -> None:
    with open_store(store_dir) as store:
        store.write(0, rand_page(1))
    with open_store(store_dir, readonly=True) as store:
        assert store.read(0, P) == rand_page(1)
        with pytest.raises(ReadOnlyStore) as info:
            store.write(0, rand_page(2))
        assert info.value.errno == errno.EROFS
        with pytest.raises(ReadOnlyStore):
            store.trim(0, P)


def test_second_writer_is_refused_naming_the_holder(store_dir: str) -> None:
    with open_store(store_dir):
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            open_store(store_dir)
        with pytest.raises(StoreLocked):
            check_store(store_dir, repair=True)
        # stats works while the store is served
        assert read_statistics(store_dir)[1].size_bytes == SMALL


def test_create_refuses_bad_input(tmp_path: Path, store_dir: str) -> None:
    with pytest.raises(StoreExists):
        create_store(store_dir, SMALL)
    for size in (0, 1000, -P):
        with pytest.raises(InvalidRequest):
            create_store(str(tmp_path / f"bad{size}"), size)
    assert not (tmp_path / "bad1000").exists()
    with pytest.raises(InvalidRequest):
        create_store(str(tmp_path / "x"), SMALL, max_share=0)


def test_open_refuses_foreign_or_missing(tmp_path: Path) -> None:
    with pytest.raises(NotAStore):
        open_store(str(tmp_path / "missing"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "file").write_text("hello")
    with pytest.raises(NotAStore):
        open_store(str(tmp_path / "foreign"))
    assert sorted(os.listdir(tmp_path / "foreign")) == ["file"]


def test_open_refuses_unknown_version_and_changes_nothing(store_dir: str) -> None:
    env = lmdb.open(os.path.join(store_dir, "meta"), max_dbs=8)
    info = env.open_db(b"info")
    with env.begin(write=True) as txn:
        txn.put(KEY_FORMAT, FORMAT.pack(b"DEDUPBLK", 99), db=info)
    env.close()
    slots = os.path.join(store_dir, "slots")
    before = os.stat(slots).st_mtime_ns
    with pytest.raises(FormatError, match="version 99"):
        open_store(store_dir)
    assert before == os.stat(slots).st_mtime_ns


def test_open_refuses_missing_or_other_backend(tmp_path: Path) -> None:
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    create_store(one, SMALL, backend=str(tmp_path / "b1"), backend_size=SMALL)
    create_store(two, SMALL, backend=str(tmp_path / "b2"), backend_size=SMALL)
    os.rename(tmp_path / "b1", tmp_path / "b1.saved")
    with pytest.raises(BackendMismatch, match="missing"):
        open_store(one)
    os.rename(tmp_path / "b2", tmp_path / "b1")
    with pytest.raises(BackendMismatch, match="another store"):
        open_store(one)


def test_create_refuses_a_backend_file_of_another_store(tmp_path: Path) -> None:
    one, two, slots = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "b")
    create_store(one, SMALL, backend=slots, backend_size=SMALL)
    with open_store(one) as store:
        store.write(0, rand_page(5))
    result = CliRunner().invoke(main, ["create", two, "--size", "1M", "--backend", slots])
    assert result.exit_code != 0
    assert "already holds the slots of a dedupblk store" in result.output
    assert not os.path.exists(two)
    with open_store(one) as store:
        assert store.read(0, P) == rand_page(5)


def test_reuse_backend_takes_over_a_preallocated_file(tmp_path: Path) -> None:
    one, two, slots = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "b")
    create_store(one, SMALL, backend=slots, backend_size=SMALL, preallocate=True)
    with open_store(one) as store:
        store.write(0, rand_page(5))
        store.flush()
    before = os.stat(slots)
    result = CliRunner().invoke(
        main, ["create", two, "--size", "1M", "--backend", slots, "--backend-size", str(SMALL),
               "--reuse-backend", "--preallocate"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    after = os.stat(slots)
    assert (after.st_size, after.st_blocks) == (before.st_size, before.st_blocks)
    with open_store(two) as store:
        assert store.read(0, P) == bytes(P)  # the old store's pages are gone
        store.write(P, rand_page(6))
        assert store._backend.direct  # still a preallocated file
    assert check_store(two).problems == []
    with pytest.raises(BackendMismatch, match="another store"):
        open_store(one)


def test_reusing_a_backend_file_for_a_larger_device_grows_it(tmp_path: Path) -> None:
    one, two, slots = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "b")
    create_store(one, SMALL, backend=slots, preallocate=True)
    create_store(two, 8 * SMALL, backend=slots, preallocate=True, reuse_backend=True)
    with open_store(two) as store:
        pages = 8 * SMALL // P
        assert store.config.slot_capacity > pages  # the default: the device and a quarter more
        store.write(0, b"".join(rand_page(n) for n in range(pages)))  # every page unique
        store.flush()
        assert store.read((pages - 1) * P, P) == rand_page(pages - 1)
    assert os.stat(slots).st_blocks * 512 >= os.stat(slots).st_size  # preallocated in full


def test_a_failed_create_removes_the_backend_file_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = tmp_path / "b"

    def full(fd: int, end: int, what: str) -> None:
        raise StoreFull(f"no space to preallocate {what}")

    monkeypatch.setattr(backend_module, "fill_holes", full)
    with pytest.raises(StoreFull):
        create_store(str(tmp_path / "s"), SMALL, backend=str(slots), preallocate=True)
    assert not slots.exists() and not (tmp_path / "s").exists()
    monkeypatch.undo()
    create_store(str(tmp_path / "s"), SMALL, backend=str(slots), preallocate=True)  # a retry works


def test_no_backend_file_is_made_in_dev(tmp_path: Path) -> None:
    with pytest.raises(BackendMismatch, match="does not exist"):
        create_store(str(tmp_path / "s"), SMALL, backend="/dev/dedupblk-no-such-device")
    assert not os.path.exists("/dev/dedupblk-no-such-device")


def test_map_grows_instead_of_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta_module, "INITIAL_MAP_SIZE", 64 << 10)
    path = str(tmp_path / "s")
    create_store(path, 16 << 20)
    with open_store(path) as store:
        start = store._meta.env.info()["map_size"]
        store.write(0, b"".join(rand_page(n) for n in range(2048)))
        store.flush()
        assert store._meta.env.info()["map_size"] > start
        assert store.read(2047 * P, P) == rand_page(2047)
    assert check_store(path).problems == []


def test_map_growth_without_disk_space_is_store_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writable map is allocated on disk before it grows (a write through it into a hole of
    a full filesystem would be SIGBUS): no room is `StoreFull`, the pages that needed it are
    dropped (nothing that failed stays in memory; what was committed stays), and writes succeed
    once there is room."""
    monkeypatch.setattr(meta_module, "INITIAL_MAP_SIZE", 64 << 10)
    path = str(tmp_path / "s")
    create_store(path, 16 << 20)
    pages = b"".join(rand_page(n) for n in range(3000))
    with open_store(path) as store:
        real_fallocate = os.posix_fallocate
        store.write(0, rand_page(9999))
        store.commit()

        def no_space(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(meta_module.os, "posix_fallocate", no_space)
        store.write(P, pages)  # 3000 more pages need more than the 128 KiB map has grown to
        with pytest.raises(StoreFull, match="metadata"):
            store.commit()
        assert not store._pending
        assert store.read(0, P) == rand_page(9999)  # what was committed stays
        for n in range(3000):  # each page is what was committed of it: the new bytes, or none
            assert store.read((n + 1) * P, P) in (rand_page(n), bytes(P))
        assert store.check().problems == []
        monkeypatch.setattr(meta_module.os, "posix_fallocate", real_fallocate)
        store.write(P, pages)
        store.commit()
        assert store.statistics().mapped_pages == 3001
    assert check_store(path).problems == []


def test_pending_pages_commit_within_the_time_window(store_dir: str) -> None:
    with open_store(store_dir) as store:
        with store._lock:  # the committer cannot run in between: no race with its time window
            store.write(0, rand_page(1))
            assert read_statistics(store_dir)[1].stored_pages == 0
        deadline = time.monotonic() + 30
        while read_statistics(store_dir)[1].stored_pages == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_statistics(store_dir)[1].stored_pages == 1


def test_a_dead_committer_is_replaced_by_the_next_batch(
    store_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background thread dies on an unexpected error in a commit: the next write must still
    be committed within the time window (a new thread takes over)."""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with open_store(store_dir) as store:
        real_commit = store._commit_sealed

        def fail_once() -> None:
            monkeypatch.setattr(store, "_commit_sealed", real_commit)
            raise RuntimeError("simulated failure in the committer thread")

        monkeypatch.setattr(store, "_commit_sealed", fail_once)
        store.write(0, rand_page(1))  # the committer's timed commit fails, and it dies
        first = store._committer
        assert first is not None
        first.join(30)
        assert not first.is_alive()
        assert [type(exc) for exc in died] == [RuntimeError]
        store.write(P, rand_page(3))
        deadline = time.monotonic() + 30
        while read_statistics(store_dir)[1].mapped_pages < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert read_statistics(store_dir)[1].mapped_pages == 2
        assert store._committer is not first


def test_pruning_may_remove_the_newest_entry(tmp_path: Path) -> None:
    """Shared entries are kept and the newest, single one is dropped: the walk over the bucket
    ends with its last entry."""
    path = str(tmp_path / "s")
    create_store(path, SMALL, max_index_entries=2)
    a, b, c = rand_page(1), rand_page(2), rand_page(3)
    with open_store(path) as store:
        for n, page in enumerate([a, a, b, b, c]):
            store.write(n * P, page)
        store.commit()
        assert store.statistics().index_entries == 2
        assert [store.read(n * P, P) for n in range(5)] == [a, a, b, b, c]
    assert check_store(path).problems == []


def test_without_group_commit_only_the_caller_commits(store_dir: str) -> None:
    """The ublk server's mode: no background thread commits (it commits every pass itself)."""
    with open_store(store_dir, group_commit=False) as store:
        store.write(0, rand_page(1))
        time.sleep(GROUP_SECONDS * 6)  # several windows in which group commit would have run
        assert read_statistics(store_dir)[1].stored_pages == 0
        store.commit()
        assert read_statistics(store_dir)[1].stored_pages == 1


def test_cached_slot_contents_follow_slot_reuse(tmp_path: Path) -> None:
    """Verification and reads use cached slot contents: a slot freed and reused for other bytes
    must never be matched or read with its old ones. Three data slots: the freed one is the only
    one left, so it is reused."""
    path = str(tmp_path / "s")
    create_store(path, SMALL, backend_size=4 * P)
    a, b, c = rand_page(11), rand_page(12), rand_page(13)
    with open_store(path) as store:
        store.write(0, a)
        store.commit()
        (slot_a,) = store._slot_cache  # cached when written
        store.write(0, b)  # a's slot dies...
        store.write(2 * P, rand_page(14))  # (the last never-used slot)
        store.flush()  # ...and is free again once that is durable
        store.write(P, c)
        store.commit()
        assert store._slot_cache[slot_a] == c  # reused for c, cache follows
        store.write(3 * P, c)  # c again: shares the reused slot, verified against c
        store.commit()
        assert [store.read(n * P, P) for n in range(4)] == [b, c, rand_page(14), c]
        with pytest.raises(StoreFull):  # a again: it needs a new slot, not the reused one
            store.write(4 * P, a)
        stats = store.statistics()
        assert (stats.mapped_pages, stats.stored_pages) == (4, 3)
        assert store.check().problems == []


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("2G") == 2 << 30
    assert parse_size("1t") == 1 << 40
    assert parse_size("3MiB") == 3 << 20
    for bad in ("", "M", "1.5G", "12Q", "-4K"):
        with pytest.raises(InvalidRequest):
            parse_size(bad)


def test_reopen_keeps_everything(store_dir: str) -> None:
    data = b"".join(rand_page(n % 5) for n in range(40)) + b"\x11" * P + bytes(P)
    with open_store(store_dir) as store:
        store.write(0, data)
    with open_store(store_dir) as store:
        assert store.read(0, len(data)) == data
        assert store.statistics().stored_pages == 5


def test_block_layout_is_as_specified(store_dir: str) -> None:
    """The first slot of the data file is the header naming this store."""
    with open(os.path.join(store_dir, "slots"), "rb") as f:
        magic, version = struct.unpack("<8sI", f.read(12))
    assert (magic, version) == (b"DDBKSLOT", 1)


def test_discard_never_fails_for_space_but_write_zeroes_may(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL, backend_size=3 * P)  # header + 2 slots
    with open_store(path) as store:
        store.write(0, rand_page(1) + rand_page(2))
        store.flush()
        store.trim(100, 50)  # the page would need a third slot: it keeps its bytes
        assert store.read(0, P) == rand_page(1)
        with pytest.raises(StoreFull):
            store.write_zeroes(100, 50)
        store.trim(P, P)  # a whole page always goes
        store.flush()
        store.trim(100, 50)  # now there is room: the partial page is zeroed
        assert store.read(0, P) == rand_page(1)[:100] + bytes(50) + rand_page(1)[150:]
    assert check_store(path).problems == []


def test_close_while_another_thread_writes_leaves_a_store_that_checks_clean(tmp_path: Path) -> None:
    # close writes the store's state record: only once no batch another thread handed over is
    # between its commit and its counting (the committer syncs and commits without the lock).
    path = str(tmp_path / "s")
    create_store(path, 16 << 20)
    applying = threading.Event()

    def slow_fingerprint(page: bytes) -> Fingerprint:
        applying.set()
        time.sleep(0.0002)
        return xxh3_128(page)

    store = open_store(path, fingerprint=slow_fingerprint)

    def writer() -> None:
        for page in range(3 * GROUP_PAGES):
            try:
                store.write(page * P, rand_page(page))
            except StoreError:
                return  # closed under it

    threading.Thread(target=writer, daemon=True).start()
    assert applying.wait(10)
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive()
    with open_store(path, readonly=True) as reopened:
        assert reopened.check().problems == []
