"""Durable and volatile stores (the format's "Write order and durability"), and the faults a
production device must survive: a failed sync, a full filesystem, a damaged or truncated
metadata file, a removed lock file, a reader racing the writer's map growth."""

from __future__ import annotations

import errno
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from dedupblk.errors import BackendError, FormatError, StoreFull, StoreLocked, SyncFailed
from dedupblk.store import backend as backend_module
from dedupblk.store import create_store, open_store, read_statistics
from dedupblk.store import meta as meta_module
from dedupblk.store.format import FIRST_DATA_SLOT
from dedupblk.store.meta import Meta
from tests.conftest import REPO, SMALL, _need_root_and, allocated_bytes, rand_page

P = 4096
SHM = Path("/dev/shm")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on tmpfs (a volatile store's place)."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        yield Path(tmp)


def test_a_store_on_disk_commits_durably_and_one_in_ram_does_not(
    tmp_path: Path, shm_dir: Path
) -> None:
    disk, ram = str(tmp_path / "disk"), str(shm_dir / "ram")
    create_store(disk, SMALL)
    create_store(ram, SMALL)
    with open_store(disk) as store:
        assert store.volatile is None
        flags = store._meta.env.flags()
        assert (flags["sync"], flags["metasync"], flags["map_async"]) == (True, False, False)
    with open_store(ram) as store:
        assert store.volatile == f"{ram}/meta is on tmpfs"
        assert store._meta.env.flags()["sync"] is False


def test_a_volatile_store_gives_a_freed_slot_back_at_its_commit(shm_dir: Path) -> None:
    path = str(shm_dir / "s")
    create_store(path, SMALL)
    slots = os.path.join(path, "slots")
    with open_store(path) as store:
        store.write(0, rand_page(1))
        store.commit()
        full = allocated_bytes(slots)
        free = store._counts.total
        store.write(0, rand_page(2))  # the first slot dies in this commit...
        store.commit()
        assert store._counts.total == free  # ...and is free again at once, no flush needed
        assert allocated_bytes(slots) == full  # punched: one page taken, one given back
        assert not store._counts.unreleased


def test_a_trim_gives_back_slots_written_in_any_order(tmp_path: Path) -> None:
    # Pages written in random order, a few per commit, have their slots scattered: a trim of a
    # page range frees slots that are no run in the backend, and each must still be punched.
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    slots = os.path.join(path, "slots")
    order = list(range(256))
    random.Random(5).shuffle(order)
    with open_store(path) as store:
        for n, page in enumerate(order):
            store.write(page * P, rand_page(1000 + page))
            if n % 8 == 7:
                store.commit()
        store.flush()
        written = allocated_bytes(slots)
        store.trim(0, 128 * P)
        store.flush()
        assert allocated_bytes(slots) <= written - 120 * P
        assert store.read(0, 128 * P) == bytes(128 * P)
        assert store.read(128 * P, P) == rand_page(1128)


def test_a_durable_store_writes_a_released_slot_again_before_punching_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Overwrites free slots that are no run in the backend: punching each as it is released
    # would cost one fallocate per page written. A released slot is taken again first, and
    # what is left is punched at the flush.
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    slots = os.path.join(path, "slots")
    with open_store(path, group_commit=False) as store:
        punched: list[int] = []
        discard = store._backend.discard
        monkeypatch.setattr(store._backend, "discard",
                            lambda s: (punched.extend(s), discard(s)))  # fmt: skip
        for version in range(4):  # each version frees the slots of the one before it
            order = random.Random(version).sample(range(64), 64)
            for n, page in enumerate(order):
                store.write(page * P, rand_page(100 * version + page))
                if n % 8 == 7:
                    store.commit()
        assert punched == []  # 192 slots freed, and each written again or still released
        assert store.statistics().stored_pages == 64
        # The slots, those freed by the last three commits, the header and ext4's extent blocks:
        assert allocated_bytes(slots) <= (64 + 24 + 4) * P
        store.flush()
        assert 0 < len(punched) <= 24
        assert allocated_bytes(slots) <= (64 + 4) * P
        store.trim(0, 32 * P)
        store.flush()
        assert len(punched) >= 32 + 1
        assert len(punched) == len(set(punched))
        assert not store._counts.unpunched
        assert allocated_bytes(slots) <= (32 + 4) * P
        assert store.read(32 * P, 32 * P) == b"".join(rand_page(300 + p) for p in range(32, 64))
        assert store.check().problems == []


def test_a_punch_spares_the_slots_of_the_batch_being_committed(tmp_path: Path) -> None:
    # A pipelined commit syncs slot data without the store's lock, so a flush may punch while
    # a batch that took released slots is between its data writes and its commit.
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path, group_commit=False) as store:
        store.write(0, b"".join(rand_page(p) for p in range(8)))
        store.commit()
        store.write(0, b"".join(rand_page(50 + p) for p in range(8)))
        store.commit()
        store.write(8 * P, rand_page(99))
        store.commit()  # the 8 freed slots are released now, not punched
        pool = set(store._counts.unpunched)
        assert len(pool) == 8

        class InFlight:
            new_data = dict.fromkeys(sorted(pool)[:3], b"")

        store._applying = InFlight()  # type: ignore[assignment]
        store._punch_released()
        assert store._counts.unpunched == set(sorted(pool)[:3])
        store._applying = None


def test_a_run_of_free_slots_is_taken_without_the_slot_a_commit_just_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The allocator takes slots from runs of refcount 0; a slot the last commit freed has
    # refcount 0 too, but the state before that commit (which a power cut may return to)
    # still names it.
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path, group_commit=False) as store:
        written: list[int] = []
        write_slots = store._backend.write_slots
        monkeypatch.setattr(store._backend, "write_slots",
                            lambda items, **kw: (written.extend(s for s, _ in items),
                                                 write_slots(items, **kw)))  # fmt: skip
        store.write(0, b"".join(rand_page(p) for p in range(10)))
        store.commit()
        assert sorted(written) == list(range(FIRST_DATA_SLOT, FIRST_DATA_SLOT + 10))
        store.trim(4 * P, P)
        store.trim(6 * P, P)
        store.flush()  # the slots of pages 4 and 6 are free and released
        store.write(5 * P, rand_page(50))
        store.commit()  # frees page 5's old slot, between those two
        (dead,) = store._counts.unreleased
        assert dead == FIRST_DATA_SLOT + 5
        store._counts.rover = FIRST_DATA_SLOT  # as when the allocator wraps around
        written.clear()
        store.write(20 * P, b"".join(rand_page(60 + p) for p in range(3)))
        store.commit()
        assert FIRST_DATA_SLOT + 4 in written and FIRST_DATA_SLOT + 6 in written
        assert dead not in written
        store.flush()
        assert store.read(20 * P, 3 * P) == b"".join(rand_page(60 + p) for p in range(3))
        assert store.read(5 * P, P) == rand_page(50)
        assert store.check().problems == []


def test_a_durable_store_releases_a_freed_slot_one_commit_later(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path) as store:
        store.write(0, rand_page(1))
        store.commit()
        free = store._counts.total
        store.write(0, rand_page(2))
        store.commit()  # commit N frees the slot: a power cut may still go back to N - 1
        (dead,) = store._counts.unreleased
        assert store._counts.total == free - 1
        store.write(P, rand_page(3))
        store.commit()  # commit N + 1 synced: N - 1 is no longer a state a restart can find
        assert dead not in store._counts.unreleased
        store.write(0, rand_page(4))
        store.commit()
        assert store._counts.unreleased
        store.flush()  # a flush makes the last commit durable: everything is released
        assert not store._counts.unreleased


def test_slot_data_is_synced_before_the_commit_that_maps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    events: list[str] = []
    with open_store(path) as store:
        backend, meta = store._backend, store._meta
        real_write, real_sync, real_commit = backend.write_slots, backend.sync, Meta.write
        monkeypatch.setattr(
            backend, "write_slots", lambda *a, **k: (events.append("data"), real_write(*a, **k))
        )
        monkeypatch.setattr(backend, "sync", lambda: (events.append("sync"), real_sync()))

        def write(self: Meta, body: object, **options: object) -> object:
            result = real_commit(self, body, **options)  # type: ignore[arg-type]
            events.append("commit")
            return result

        monkeypatch.setattr(Meta, "write", write)
        store.write(0, rand_page(1))
        store.commit()
        assert meta is store._meta
    assert events[:3] == ["data", "sync", "commit"]


def test_a_failed_sync_fails_every_later_write_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path) as store:
        store.write(0, rand_page(1))
        store.flush()
        real = os.fdatasync

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(backend_module.os, "fdatasync", failing)
        store.write(P, rand_page(2))
        with pytest.raises(SyncFailed):
            store.commit()
        monkeypatch.setattr(backend_module.os, "fdatasync", real)  # the disk "recovers"...
        for attempt in (lambda: store.write(2 * P, rand_page(3)), store.flush, store.commit):
            with pytest.raises(BackendError, match="reopen the store"):
                attempt()
        assert store.read(0, P) == rand_page(1)
    with open_store(path) as store:  # ...and a reopened store works, with what was durable
        assert store.read(0, P) == rand_page(1)
        store.write(2 * P, rand_page(3))
        store.flush()
        assert store.check().problems == []


class _FailingCommits:
    """An LMDB environment whose write transactions fail to commit (as a commit's sync that
    failed: LMDB raises, and what reached the disk is unknown)."""

    def __init__(self, env: Any) -> None:
        self._env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        txn = self._env.begin(*args, **kwargs)
        return _FailingCommit(txn) if kwargs.get("write") else txn


class _FailingCommit:
    def __init__(self, txn: Any) -> None:
        self._txn = txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def commit(self) -> None:
        self._txn.abort()
        raise lmdb.Error("mdb_txn_commit: Input/output error")


@pytest.mark.parametrize("where", ["commit", "flush"])
def test_a_failed_metadata_sync_fails_every_later_write_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # LMDB's own sync: in a durable store's every commit, and the flush's sync of the meta page.
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path, group_commit=False) as store:
        store.write(0, rand_page(1))
        store.flush()
        meta = store._meta
        real_env, real_sync = meta.env, meta.sync
        if where == "commit":
            monkeypatch.setattr(meta, "env", _FailingCommits(real_env))
        else:

            def failing_sync() -> None:
                raise SyncFailed("syncing metadata: Input/output error")

            monkeypatch.setattr(meta, "sync", failing_sync)
        store.write(P, rand_page(2))
        with pytest.raises(SyncFailed):
            store.flush()
        monkeypatch.setattr(meta, "env", real_env)  # the disk "recovers"...
        monkeypatch.setattr(meta, "sync", real_sync)
        for attempt in (lambda: store.write(2 * P, rand_page(3)), store.flush, store.commit):
            with pytest.raises(BackendError, match="reopen the store"):
                attempt()
    with open_store(path) as store:  # ...and a reopened store works, with what was durable
        assert store.read(0, P) == rand_page(1)
        store.write(2 * P, rand_page(3))
        store.flush()
        assert store.check().problems == []


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem of 6 MiB on a loop device, mounted (root only)."""
    _need_root_and("mount", "a full filesystem")
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(6 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_slot_filesystem_gives_enospc_and_frees_space_by_trim(
    tmp_path: Path, small_filesystem: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "s")
    create_store(path, 16 << 20, backend=str(small_filesystem / "slots"))  # sparse, 20 MiB
    written = 0
    logs = caplog.at_level(logging.ERROR, logger="dedupblk.store.store")
    with logs, open_store(path, group_commit=False) as store:  # every commit is the test's
        with pytest.raises(StoreFull):  # noqa: PT012 -- until the filesystem is full
            for page in range(4096):
                store.write(page * P, rand_page(page))
                if page % 64 == 63:
                    store.commit()
                    written = page + 1
        assert written > 0
        assert not store._pending  # no failed page is kept in memory
        store.flush()  # that commit's caller was told: nothing more to report
        for page in range(written, written + 64):
            assert store.read(page * P, P) == bytes(P)  # back to what was committed
        # Pages acknowledged, then dropped by a commit their writer did not ask for (here: the
        # batch grew full): the next flush says so.
        store.write(written * P, b"".join(rand_page(30000 + n) for n in range(64)))
        with pytest.raises(StoreFull):
            store.write((written + 64) * P, b"".join(rand_page(40000 + n) for n in range(1024)))
        assert not store._pending
        with pytest.raises(StoreFull, match="earlier write failed"):
            store.flush()
        store.flush()  # once
        for attempt in range(50):  # more failures: logged at most every few seconds
            store.write(written * P, b"".join(rand_page(20000 + 64 * attempt + n)
                                              for n in range(64)))  # fmt: skip
            with pytest.raises(StoreFull):
                store.commit()
        store.trim(0, written * P)  # a trim needs no new data: it commits and frees space
        store.flush()
        store.write(0, b"".join(rand_page(10000 + n) for n in range(64)))
        store.flush()
        assert store.read(P, P) == rand_page(10001)
        assert store.check().problems == []
    assert len([r for r in caplog.records if "commit failed" in r.message]) <= 2


def test_a_read_only_store_accepts_flush(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path, readonly=True) as store:
        store.flush()


def test_the_lock_holds_when_its_file_is_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path):
        os.unlink(os.path.join(path, "lock"))
        with pytest.raises(StoreLocked, match="in use"):
            open_store(path)
        with pytest.raises(StoreLocked):
            open_store(path, readonly=True)


def test_store_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = os.umask(0o022)
    try:
        create_store(str(path), SMALL)
        with open_store(path):
            pass
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o700
    for name in ("meta", "meta/data.mdb", "meta/lock.mdb", "slots", "lock"):
        mode = (path / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, (name, oct(mode))


def _cli(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "dedupblk.cli", *args], cwd=REPO,
                          capture_output=True, check=False)  # fmt: skip
    return done.returncode, done.stderr.decode(errors="replace")


def test_a_truncated_metadata_file_is_one_line_for_every_command(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    create_store(path, SMALL)
    with open_store(path) as store:
        for page in range(200):
            store.write(page * P, rand_page(page))
        store.flush()
    data = Path(path, "meta", "data.mdb")
    used = Meta(path, readonly=True)
    in_use = used.used_bytes()
    used.close()
    os.truncate(data, in_use // 2)
    for command in (["info", path], ["stats", path], ["check", path], ["check", path, "--repair"],
                    ["dump", path, "0", "4096"]):  # fmt: skip
        code, err = _cli(*command)
        assert code > 0, (command, code, err)  # < 0 would be a signal (SIGBUS)
        assert err.count("\n") == 1, (command, err)
        assert f"{path}: the metadata is truncated (" in err, (command, err)
    # A writer (a server) is refused before LMDB would extend the file and hide the damage.
    with pytest.raises(FormatError, match="the metadata is truncated"):
        open_store(path)
    assert os.path.getsize(data) == in_use // 2


def test_a_reader_follows_a_writer_that_grows_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's environment is mapped at the size the file had when it opened; another
    process's writer then grows the map, and LMDB refuses the reader's next transaction
    (MDB_MAP_RESIZED) until it maps the new size: the reader does so and goes on."""
    path = str(tmp_path / "s")
    monkeypatch.setattr(meta_module, "INITIAL_MAP_SIZE", 64 << 10)  # a map the writer outgrows
    create_store(path, 64 << 20)
    data = Path(path, "meta", "data.mdb")
    reader = Meta(path, readonly=True)
    first = data.stat().st_size
    subprocess.run([sys.executable, "-c", f"""
import random
from dedupblk.store import open_store
with open_store({path!r}) as store:
    for n in range(12000):
        store.write(n * 4096, random.Random(n).randbytes(4096))
"""], cwd=REPO, check=True)  # fmt: skip
    assert data.stat().st_size > first  # the map did grow
    try:
        assert reader.read_header()[1].mapped_pages == 12000
    finally:
        reader.close()
    assert read_statistics(path)[1].mapped_pages == 12000
