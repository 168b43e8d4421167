"""What a failed commit leaves (the `dedupblk.store.store` docstring): the pages it could not keep
read as what was committed before them, never over a newer write; its error reaches the next flush;
the committer outlives any failure; after a failed sync nothing more is committed; and a full
filesystem or a busy writer never keeps a trim or a flush from finishing.

Faults are injected where a disk would raise them: the backend's data sync, LMDB's file growth."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest

from dedupblk.errors import BackendError, DedupblkError, FormatError, SyncFailed
from dedupblk.store import create_store, open_store, read_statistics
from dedupblk.store import meta as meta_module
from dedupblk.store import store as store_module
from dedupblk.store.backend import Backend
from tests.conftest import rand_page

P = 4096
HANG = 30.0  # seconds after which a wait that should end at once is a hang


def _page(tag: int, n: int) -> bytes:
    return rand_page(tag * 100_000 + n)


def _first_committer_sync(
    monkeypatch: pytest.MonkeyPatch, fault: Callable[[], None]
) -> threading.Event:
    """Make the committer's first data sync run ``fault`` once the returned event is set."""
    real = Backend.sync
    go = threading.Event()
    first = [True]

    def sync(self: Backend) -> None:
        if first[0] and threading.current_thread().name == "dedupblk-commit":
            first[0] = False
            assert go.wait(HANG)
            fault()
        real(self)

    monkeypatch.setattr(Backend, "sync", sync)
    return go


def _raise(error: BaseException) -> Callable[[], None]:
    def fault() -> None:
        raise error

    return fault


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> int:
    """Buffers of 8 pages, handed over only when full (never by age)."""
    monkeypatch.setattr(store_module, "GROUP_PAGES", 8)
    monkeypatch.setattr(store_module, "GROUP_SECONDS", 1000.0)
    return 8


def test_a_failed_commit_never_replaces_a_newer_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    """Buffer A fails while buffer B, which rewrote A's pages, waits: B's pages are what is kept."""
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    go = _first_committer_sync(monkeypatch, _raise(BackendError("writing slots: injected")))
    with open_store(path) as store:
        for n in range(small_groups):  # A, handed over: its sync waits for `go`
            store.write(n * P, _page(1, n))
        for n in range(small_groups):  # B: the same pages again, handed over behind A
            store.write(n * P, _page(2, n))
        go.set()
        with pytest.raises(BackendError, match="injected"):
            store.flush()  # A's failure is reported once...
        store.flush()  # ...and B is durable
        for n in range(small_groups):
            assert store.read(n * P, P) == _page(2, n)
    with open_store(path, readonly=True) as store:
        for n in range(small_groups):
            assert store.read(n * P, P) == _page(2, n)


def test_an_unexpected_error_in_a_commit_reaches_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    """A bug in the commit path is not a silent loss: flush raises, and the store goes on."""
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    go = _first_committer_sync(monkeypatch, _raise(RuntimeError("a bug")))
    go.set()
    with open_store(path) as store:
        for n in range(small_groups):
            store.write(n * P, _page(1, n))
        with pytest.raises(BackendError, match="unexpectedly"):
            store.flush()
        store.write(0, _page(3, 0))
        store.flush()
    with open_store(path, readonly=True) as store:
        assert store.read(0, P) == _page(3, 0)
        assert store.read(P, P) == bytes(P)  # dropped with its buffer: it reads as before


def test_a_writer_waiting_on_a_commit_that_fails_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    """Three buffers' worth of writes from one thread: while the first buffer's sync waits and
    then fails, the writer waits for the second; it must finish, not wait for ever."""
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    started = [0]
    go = _first_committer_sync(monkeypatch, _raise(RuntimeError("a bug")))
    done = threading.Event()

    def writer() -> None:
        for n in range(3 * small_groups):
            started[0] = n
            store.write(n * P, _page(1, n))
        done.set()

    with open_store(path) as store:
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        while started[0] < 3 * small_groups - 1 and thread.is_alive():
            threading.Event().wait(0.01)  # the writer reaches the third buffer's last page
        go.set()
        assert done.wait(HANG), "the writer never finished"
        with pytest.raises(BackendError, match="unexpectedly"):
            store.flush()
        store.flush()
        assert store.read((3 * small_groups - 1) * P, P) == _page(1, 3 * small_groups - 1)


def test_nothing_is_committed_after_a_failed_data_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    """A page accepted while the data sync that fails was running is never committed: Linux may
    have dropped dirty slot data, so no later commit may map a slot as good."""
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    go = _first_committer_sync(monkeypatch, _raise(SyncFailed("syncing backend: injected")))
    with open_store(path) as store:
        for n in range(small_groups):
            store.write(n * P, _page(1, n))  # handed over; its sync will fail
        for n in range(small_groups):
            store.write((small_groups + n) * P, _page(2, n))  # handed over behind it
        go.set()
        with pytest.raises(BackendError):
            store.flush()
        assert read_statistics(path)[1].mapped_pages == 0
        with pytest.raises(BackendError, match="reopen the store"):
            store.write(0, _page(3, 0))
    assert read_statistics(path)[1].mapped_pages == 0


def test_a_damaged_refcount_fails_the_flush_and_points_at_check(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    with open_store(path) as store:
        store.write(0, _page(1, 0))
    env = lmdb.open(str(tmp_path / "s" / "meta"), max_dbs=8)
    refs = env.open_db(b"refs")
    with env.begin(write=True) as txn:
        key, chunk = next(iter(txn.cursor(db=refs)))
        damaged = bytearray(chunk)
        damaged[1] = 0  # slot 1, mapped once, counted zero times
        txn.put(key, bytes(damaged), db=refs)
    env.close()
    with open_store(path) as store:
        store.trim(0, P)
        with pytest.raises(FormatError, match="dedupblk check"):
            store.flush()


def test_a_trim_commits_when_the_filesystem_is_too_full_to_grow_the_map_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Growing the map ahead of need is best effort: a full filesystem must not fail the trim
    that would give space back."""
    monkeypatch.setattr(meta_module, "INITIAL_MAP_SIZE", 256 << 10)
    path = str(tmp_path / "s")
    create_store(path, 64 << 20)
    with open_store(path, group_commit=False) as store:
        n = 0
        while True:
            info, psize = store._meta.env.info(), store._meta.env.stat()["psize"]
            if (info["last_pgno"] + 1) * psize * 4 > info["map_size"] * 3:
                break
            store.write(n * P, _page(1, n))
            n += 1
            if n % 16 == 0:
                store.commit()

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(meta_module.os, "posix_fallocate", full)
        store.trim(0, 16 * P)
        store.commit()
        assert store.read(0, P) == bytes(P)
    assert read_statistics(path)[1].mapped_pages == n - 16


def test_a_flush_finishes_while_other_writers_keep_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    """Flush waits for what was handed over before it, not for buffers handed over after it: with
    a slow disk and two busy writers there is always another buffer waiting."""
    path = str(tmp_path / "s")
    create_store(path, 64 << 20)
    real = Backend.sync

    def slow_sync(self: Backend) -> None:
        threading.Event().wait(0.005)
        real(self)

    monkeypatch.setattr(Backend, "sync", slow_sync)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                page = (2 * n + k) % 16384
                store.write(page * P, n.to_bytes(8, "little") + _page(k, 0)[8:])
                n += 1
        except DedupblkError as exc:
            errors.append(exc)

    with open_store(path) as store:
        threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(2)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(3):
                flushed = threading.Event()
                threading.Thread(target=lambda: (store.flush(), flushed.set()), daemon=True).start()
                assert flushed.wait(HANG), "flush waited on writers that never stop"
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert errors == []


def test_close_waits_for_the_commit_in_progress_even_with_no_flush_to_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_groups: int
) -> None:
    # The committer syncs slot data without the store's lock. A close that makes no flush (the
    # store failed a sync elsewhere meanwhile: here set by hand) must still not release the
    # files while it does, or the commit would land in a closed environment.
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    entered, go = threading.Event(), threading.Event()
    real_sync = Backend.sync

    def sync(self: Backend) -> None:
        if threading.current_thread().name == "dedupblk-commit" and not go.is_set():
            entered.set()
            assert go.wait(HANG)
        real_sync(self)

    store = open_store(path)
    monkeypatch.setattr(Backend, "sync", sync)
    pages = b"".join(_page(1, n) for n in range(small_groups))
    store.write(0, pages)  # a full buffer: handed to the committer, which waits in its sync
    assert entered.wait(HANG)
    with store._lock:
        store._broken = SyncFailed("syncing metadata: Input/output error")
    closer = threading.Thread(target=store.close, daemon=True)  # a deadlock must not hang exit
    closer.start()
    closer.join(0.5)
    waited = closer.is_alive()
    go.set()  # (before any assertion: a committer left waiting would outlive the test)
    closer.join(HANG)
    assert waited  # close waited while the commit was in its sync
    assert not closer.is_alive()
    with open_store(path) as again:  # released, and the commit landed
        assert again.read(0, len(pages)) == pages


def test_close_releases_the_store_when_its_last_flush_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s")
    create_store(path, 1 << 20)
    store = open_store(path, group_commit=False)
    store.write(0, _page(2, 0))
    store.flush()

    def failing_write(*args: object, **kwargs: object) -> None:
        raise BackendError("writing slots: Input/output error")

    monkeypatch.setattr(store._backend, "write_slots", failing_write)
    store.write(P, _page(2, 1))
    with pytest.raises(BackendError):
        store.close()
    monkeypatch.undo()
    with open_store(path) as again:  # the files and the lock were let go
        assert again.read(0, P) == _page(2, 0)
        assert again.read(P, P) == bytes(P)
