"""The nbdkit adapter in-process, without nbdkit: a fake `nbdkit` module records what the adapter
reports, and a real store (or a fake that fails on purpose) sits behind it."""

from __future__ import annotations

import errno
import os
import random
import runpy
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.nbd import adapter as nbdkit_adapter
from dedupblk.nbd import params as nbdkit_params
from dedupblk.nbd.adapter import (
    EXTENT_DATA,
    EXTENT_HOLE_ZERO,
    FLAG_FUA,
    FLAG_REQ_ONE,
    FUA_NATIVE,
    Connection,
    InternalError,
    NbdkitPlugin,
)
from dedupblk.nbd.params import (
    THREAD_MODEL_PARALLEL,
    THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    ParameterError,
    exit_on_parameter_error,
    parse_size,
)
from dedupblk.store import (
    PAGE_SIZE,
    BackendError,
    InvalidRequest,
    ReadOnlyStore,
    StoreError,
    StoreFull,
    check_store,
    create_store,
    open_store,
)

PLUGIN = Path(nbdkit_adapter.__file__).parents[1] / "frontends" / "nbdkit_plugin.py"


class FakeNbdkit:
    """What nbdkit's `nbdkit` module gives the adapter, recorded."""

    def __init__(self) -> None:
        self.errors: list[int] = []
        self.messages: list[str] = []
        self.shutdowns = 0

    def set_error(self, err: int, /) -> None:
        self.errors.append(err)

    def debug(self, msg: str, /) -> None:
        self.messages.append(msg)

    def shutdown(self) -> None:
        self.shutdowns += 1


def configured(host: FakeNbdkit, **params: str) -> NbdkitPlugin:
    plugin = NbdkitPlugin(host)
    for key, value in params.items():
        plugin.config(key.replace("_", "-"), value)
    plugin.config_complete()
    return plugin


@pytest.fixture
def host() -> FakeNbdkit:
    return FakeNbdkit()


@pytest.fixture
def serving(host: FakeNbdkit, tmp_path: Path) -> Iterator[NbdkitPlugin]:
    """A plugin through get_ready and after_fork on a new 1 MiB store."""
    plugin = configured(host, store=str(tmp_path / "s"), size="1M")
    plugin.get_ready()
    plugin.after_fork()
    yield plugin
    plugin.cleanup()


# ---- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64K", 65536), ("1M", 1 << 20), ("2g", 2 << 30), ("1GiB", 1 << 30),
     ("3MB", 3 << 20), ("1T", 1 << 40)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size("size", text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", "12 parsecs", "1Q"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ParameterError, match=r"^size="):
        parse_size("size", text)


def test_every_parameter_is_parsed(host: FakeNbdkit, tmp_path: Path) -> None:
    plugin = configured(
        host,
        store="relative/store",
        size="8M",
        backend=str(tmp_path / "b"),
        backend_size="16M",
        max_index_entries="1000",
        max_share="9",
        readonly="yes",
        thread_model="parallel",
        control_fd="7",
    )
    settings = plugin.settings
    assert settings.store == str(Path.cwd() / "relative" / "store")  # absolute before any chdir
    assert (settings.size, settings.backend_size) == (8 << 20, 16 << 20)
    assert settings.backend == str(tmp_path / "b")
    assert (settings.max_index_entries, settings.max_share) == (1000, 9)
    assert settings.readonly is True
    assert settings.control_fd == 7
    assert plugin.thread_model() == THREAD_MODEL_PARALLEL


def test_defaults(host: FakeNbdkit) -> None:
    plugin = configured(host, store="/s")
    assert plugin.settings.readonly is False
    assert plugin.settings.size is None
    assert plugin.thread_model() == THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def test_dump_plugin_needs_no_store(host: FakeNbdkit) -> None:
    """`--dump-plugin` calls config and then thread_model and dump_plugin: no config_complete."""
    plugin = NbdkitPlugin(host)
    assert plugin.thread_model() == THREAD_MODEL_SERIALIZE_ALL_REQUESTS
    plugin.config("thread-model", "parallel")
    assert plugin.thread_model() == THREAD_MODEL_PARALLEL
    lines = plugin.dump_plugin()
    assert all(line.startswith("dedupblk_") and "=" in line for line in lines)
    documented = [line.split("=", 1)[0].removeprefix("dedupblk_parameter_") for line in lines[1:]]
    assert documented == list(nbdkit_params.PARSERS)  # every parameter, each with its help
    assert lines[0] == "dedupblk_version=0.1.0"
    assert lines[1].startswith("dedupblk_parameter_store=PATH (required)")


def test_the_export_is_described(host: FakeNbdkit, tmp_path: Path) -> None:
    for readonly, mode in (("false", ""), ("true", ", read-only")):
        plugin = configured(host, store=str(tmp_path / "s"), size="3M", readonly=readonly)
        plugin.get_ready()
        plugin.after_fork()
        try:
            described = plugin.export_description(Connection())
        finally:
            plugin.cleanup()
        assert described == f"dedupblk store {tmp_path / 's'} (3 MiB, format 2{mode})"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "store=PATH is required"),
        ({"store": "/s", "colour": "blue"}, "unknown parameter colour="),
        ({"store": ""}, "store=: empty path"),
        ({"store": "/s", "readonly": "perhaps"}, "readonly=perhaps: not a boolean"),
        ({"store": "/s", "max-share": "-3"}, "max-share=-3: not a non-negative integer"),
        ({"store": "/s", "thread-model": "fast"}, "thread-model=fast: use one of"),
        ({"store": "/s", "size": "4097"}, "size=4097: must be a positive multiple of 4096"),
        ({"store": "/s", "size": "0"}, "size=0: must be a positive multiple"),
        ({"store": "/s", "backend": "/b"}, "backend= only applies when size= creates"),
        ({"store": "/s", "max-index-entries": "5"}, "max-index-entries= only applies"),
    ],
)
def test_bad_parameters(host: FakeNbdkit, params: dict[str, str], message: str) -> None:
    plugin = NbdkitPlugin(host)

    def configure() -> None:
        for key, value in params.items():
            plugin.config(key, value)
        plugin.config_complete()

    with pytest.raises(ParameterError, match=message):
        configure()


def test_a_parameter_given_twice(host: FakeNbdkit) -> None:
    plugin = NbdkitPlugin(host)
    plugin.config("store", "/a")
    with pytest.raises(ParameterError, match="store= given twice"):
        plugin.config("store", "/b")


# ---- get_ready and after_fork ---------------------------------------------------------------


def test_size_creates_a_missing_store_once(host: FakeNbdkit, tmp_path: Path) -> None:
    path = tmp_path / "s"
    configured(host, store=str(path), size="2M", max_share="3").get_ready()
    with open_store(path, readonly=True) as store:
        assert store.size == 2 << 20
        assert store.config.max_share == 3
    configured(FakeNbdkit(), store=str(path), size="2M").get_ready()  # exists: same size is fine


def test_missing_store_without_size(host: FakeNbdkit, tmp_path: Path) -> None:
    plugin = configured(host, store=str(tmp_path / "nope"))
    with pytest.raises(ParameterError, match=r"no such store \(size=SIZE creates it\)"):
        plugin.get_ready()


def test_size_differs_from_the_existing_store(host: FakeNbdkit, tmp_path: Path) -> None:
    create_store(tmp_path / "s", 1 << 20)
    plugin = configured(host, store=str(tmp_path / "s"), size="2M")
    with pytest.raises(ParameterError, match="already exists with size 1048576"):
        plugin.get_ready()


def test_creation_error_is_a_parameter_error(host: FakeNbdkit, tmp_path: Path) -> None:
    plugin = configured(host, store=str(tmp_path / "s"), size="1M", backend_size="4096")
    with pytest.raises(ParameterError, match="bad backend size"):
        plugin.get_ready()


def test_locked_store_is_a_parameter_error(host: FakeNbdkit, tmp_path: Path) -> None:
    create_store(tmp_path / "s", 1 << 20)
    with open_store(tmp_path / "s"):
        plugin = configured(host, store=str(tmp_path / "s"))
        with pytest.raises(ParameterError, match="in use"):
            plugin.get_ready()
        with pytest.raises(ParameterError, match="in use"):
            plugin.after_fork()


def test_get_ready_leaves_the_store_closed(host: FakeNbdkit, tmp_path: Path) -> None:
    """The LMDB environment opened in get_ready must not cross nbdkit's fork."""
    plugin = configured(host, store=str(tmp_path / "s"), size="1M")
    plugin.get_ready()
    with open_store(tmp_path / "s"):  # would raise StoreLocked if get_ready had kept it open
        pass
    with pytest.raises(RuntimeError, match="not open"):
        _ = plugin.device


def test_cleanup_closes_the_store_cleanly(host: FakeNbdkit, tmp_path: Path) -> None:
    plugin = configured(host, store=str(tmp_path / "s"), size="1M")
    plugin.get_ready()
    plugin.after_fork()
    handle = plugin.open(False)
    plugin.pwrite(handle, memoryview(b"\x01\x02" * 2048), 0, 0)  # pending, not yet committed
    plugin.cleanup()
    plugin.cleanup()  # idempotent
    with open_store(tmp_path / "s", readonly=True) as store:
        assert store.read(0, 4) == b"\x01\x02\x01\x02"
    assert check_store(tmp_path / "s").problems == []


def test_closing_the_control_pipe_closes_the_store_and_ends_nbdkit(
    host: FakeNbdkit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `dedupblk serve` does on SIGTERM, when idle clients would keep nbdkit waiting."""
    monkeypatch.setattr(nbdkit_adapter, "SHUTDOWN_GRACE_SECONDS", 0.0)
    exited = threading.Event()
    codes: list[int] = []

    def exit_process(code: int) -> None:
        codes.append(code)
        exited.set()

    read_end, write_end = os.pipe()
    try:
        plugin = NbdkitPlugin(host, exit_process=exit_process)  # type: ignore[arg-type]
        for key, value in (("store", str(tmp_path / "s")), ("size", "1M"),
                           ("control-fd", str(read_end))):  # fmt: skip
            plugin.config(key, value)
        plugin.config_complete()
        plugin.get_ready()
        plugin.after_fork()
        h = plugin.open(False)
        plugin.pwrite(h, memoryview(b"\x07" * PAGE_SIZE), 0, 0)  # pending, not committed
        assert not exited.wait(timeout=0.2)  # the pipe is open: serving goes on
        os.close(write_end)
        write_end = -1
        assert exited.wait(timeout=60)
        assert codes == [0]
        assert host.shutdowns == 1
        with pytest.raises(StoreError, match="closed"):  # later requests: EIO
            plugin.pread(h, memoryview(bytearray(PAGE_SIZE)), 0, 0)
        assert host.errors == [errno.EIO]
        plugin.cleanup()  # nbdkit's own, if it gets there: nothing left to do
        with open_store(tmp_path / "s") as store:  # unlocked, and the write committed
            assert store.read(0, PAGE_SIZE) == b"\x07" * PAGE_SIZE
        assert check_store(tmp_path / "s").problems == []
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_control_fd_that_is_not_a_pipe_is_refused(host: FakeNbdkit, tmp_path: Path) -> None:
    create_store(tmp_path / "s", 1 << 20)
    with open(tmp_path / "file", "w") as not_a_pipe:
        plugin = configured(host, store=str(tmp_path / "s"), control_fd=str(not_a_pipe.fileno()))
        with pytest.raises(ParameterError, match=r"control-fd=\d+: not an open pipe"):
            plugin.get_ready()


# ---- callbacks ------------------------------------------------------------------------------


def test_capabilities_are_exact_booleans(serving: NbdkitPlugin) -> None:
    h = serving.open(False)
    for name in ("can_write", "can_flush", "can_trim", "can_zero", "can_fast_zero", "can_extents",
                 "can_multi_conn"):  # fmt: skip
        assert getattr(serving, name)(h) is True, name
    assert serving.is_rotational(h) is False
    assert serving.can_fua(h) == FUA_NATIVE
    assert serving.get_size(h) == 1 << 20
    minimum, preferred, maximum = serving.block_size(h)
    assert minimum == PAGE_SIZE
    assert minimum <= preferred <= maximum
    assert preferred & (preferred - 1) == 0  # NBD wants powers of two
    assert maximum % minimum == 0


def test_readonly_export_cannot_write(host: FakeNbdkit, tmp_path: Path) -> None:
    create_store(tmp_path / "s", 1 << 20)
    plugin = configured(host, store=str(tmp_path / "s"), readonly="true")
    plugin.get_ready()
    plugin.after_fork()
    try:
        h = plugin.open(True)
        assert plugin.can_write(h) is False
        # nbdkit refuses writes itself; if one got through, the store says EROFS.
        with pytest.raises(ReadOnlyStore):
            plugin.pwrite(h, memoryview(bytes(PAGE_SIZE)), 0, 0)
        assert host.errors == [errno.EROFS]
    finally:
        plugin.cleanup()


def test_pread_fills_the_buffer(serving: NbdkitPlugin) -> None:
    h = serving.open(False)
    data = bytes(range(256)) * 24
    serving.pwrite(h, memoryview(data), 1000, 0)
    buf = bytearray(b"\xff" * 8192)
    serving.pread(h, memoryview(buf), 0, 0)
    assert buf == bytes(1000) + data + bytes(8192 - 1000 - len(data))


def test_pwrite_copies_the_buffer_nbdkit_reuses(serving: NbdkitPlugin) -> None:
    h = serving.open(False)
    buf = bytearray(b"\x11" * PAGE_SIZE + b"\x22" * 8 + bytes(PAGE_SIZE - 8))
    serving.pwrite(h, memoryview(buf), 0, 0)
    buf[:] = bytes(len(buf))  # nbdkit reuses its buffer for the next request
    out = bytearray(2 * PAGE_SIZE)
    serving.pread(h, memoryview(out), 0, 0)
    assert out == b"\x11" * PAGE_SIZE + b"\x22" * 8 + bytes(PAGE_SIZE - 8)


def test_fua_write_is_durable_at_once(serving: NbdkitPlugin, tmp_path: Path) -> None:
    h = serving.open(False)
    serving.pwrite(h, memoryview(b"\x5a" * 3 + bytes(PAGE_SIZE - 3)), 0, FLAG_FUA)
    assert serving.device.statistics().mapped_pages == 1  # committed, not pending


def test_zero_trim_and_extents(serving: NbdkitPlugin) -> None:
    h = serving.open(False)
    serving.pwrite(h, memoryview(b"\x07" * (8 * PAGE_SIZE)), 0, 0)
    serving.zero(h, 2 * PAGE_SIZE, PAGE_SIZE, 0)
    serving.trim(h, PAGE_SIZE, 5 * PAGE_SIZE, 0)
    serving.zero(h, 100, 7 * PAGE_SIZE + 10, 0)  # partial page: zeroed bytes, page stays data
    serving.flush(h, 0)
    assert serving.extents(h, 10 * PAGE_SIZE, 0, 0) == [
        (0, PAGE_SIZE, EXTENT_DATA),
        (PAGE_SIZE, 2 * PAGE_SIZE, EXTENT_HOLE_ZERO),
        (3 * PAGE_SIZE, 2 * PAGE_SIZE, EXTENT_DATA),
        (5 * PAGE_SIZE, PAGE_SIZE, EXTENT_HOLE_ZERO),
        (6 * PAGE_SIZE, 2 * PAGE_SIZE, EXTENT_DATA),
        (8 * PAGE_SIZE, 2 * PAGE_SIZE, EXTENT_HOLE_ZERO),
    ]
    assert serving.extents(h, 10 * PAGE_SIZE, 0, FLAG_REQ_ONE) == [(0, PAGE_SIZE, EXTENT_DATA)]
    out = bytearray(PAGE_SIZE)
    serving.pread(h, memoryview(out), 7 * PAGE_SIZE, 0)
    assert out == b"\x07" * 10 + bytes(100) + b"\x07" * (PAGE_SIZE - 110)


def test_extents_cover_a_prefix_of_a_large_range(
    serving: NbdkitPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nbdkit_adapter, "MAXIMUM_EXTENTS_SPAN", 4 * PAGE_SIZE)
    h = serving.open(False)
    assert serving.extents(h, 1 << 20, PAGE_SIZE, 0) == [
        (PAGE_SIZE, 4 * PAGE_SIZE, EXTENT_HOLE_ZERO)
    ]


# ---- the error boundary ---------------------------------------------------------------------


class FailingStore:
    """Stands in for the store and raises `error` from every request."""

    size = 1 << 20

    def __init__(self, error: Exception) -> None:
        self.error = error

    def fail(self, *args: object, **kwargs: object) -> None:
        raise self.error

    read = write = write_zeroes = trim = flush = extents = fail


@pytest.mark.parametrize(
    ("error", "errnum"),
    [
        (StoreFull("no free slot"), errno.ENOSPC),
        (BackendError("pwrite failed"), errno.EIO),
        (ReadOnlyStore("read-only"), errno.EROFS),
        (InvalidRequest("outside"), errno.EINVAL),
    ],
)
def test_store_errors_become_their_errno(host: FakeNbdkit, error: Exception, errnum: int) -> None:
    plugin = NbdkitPlugin(host)
    plugin._store = FailingStore(error)  # type: ignore[assignment]
    h = Connection()
    calls = [
        lambda: plugin.pread(h, memoryview(bytearray(PAGE_SIZE)), 0, 0),
        lambda: plugin.pwrite(h, memoryview(bytes(PAGE_SIZE)), 0, 0),
        lambda: plugin.flush(h, 0),
        lambda: plugin.trim(h, PAGE_SIZE, 0, 0),
        lambda: plugin.zero(h, PAGE_SIZE, 0, 0),
        lambda: plugin.extents(h, PAGE_SIZE, 0, 0),
    ]
    for call in calls:
        with pytest.raises(type(error)) as raised:
            call()
        assert raised.value is error  # the one-line message nbdkit logs is the store's own
    assert host.errors == [errnum] * len(calls)


def test_unexpected_exception_is_eio_with_its_traceback(host: FakeNbdkit) -> None:
    plugin = NbdkitPlugin(host)
    plugin._store = FailingStore(ZeroDivisionError("a bug"))  # type: ignore[assignment]
    with pytest.raises(InternalError) as raised:
        plugin.pwrite(Connection(), memoryview(bytes(PAGE_SIZE)), 0, 0)
    assert host.errors == [errno.EIO]
    message = str(raised.value)
    assert message.startswith("pwrite: unexpected error, returning EIO\nTraceback")
    assert "in fail" in message
    assert message.endswith("ZeroDivisionError: a bug")


def test_real_store_errors_over_the_boundary(serving: NbdkitPlugin, host: FakeNbdkit) -> None:
    h = serving.open(False)
    with pytest.raises(InvalidRequest):
        serving.pread(h, memoryview(bytearray(PAGE_SIZE)), (1 << 20) - 100, 0)
    assert host.errors == [errno.EINVAL]
    out = bytearray(PAGE_SIZE)
    serving.pread(h, memoryview(out), 0, 0)  # and it keeps serving
    assert out == bytes(PAGE_SIZE)


def test_full_store_is_enospc(host: FakeNbdkit, tmp_path: Path) -> None:
    plugin = configured(host, store=str(tmp_path / "s"), size="1M", backend_size="16K")
    plugin.get_ready()
    plugin.after_fork()
    try:
        h = plugin.open(False)
        pages = [random.Random(seed).randbytes(PAGE_SIZE) for seed in range(8)]
        accepted = 0
        with pytest.raises(StoreFull):  # noqa: PT012  (fails at whichever page finds no slot)
            for accepted, page in enumerate(pages):
                plugin.pwrite(h, memoryview(page), accepted * PAGE_SIZE, 0)
        assert 0 < accepted < len(pages)
        assert host.errors == [errno.ENOSPC]
        plugin.pwrite(h, memoryview(pages[0]), 100 * PAGE_SIZE, 0)  # a duplicate needs no slot
    finally:
        plugin.cleanup()


def test_exit_on_parameter_error_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(nbdkit_params.os, "_exit", fake_exit)

    def config(key: str, value: str) -> None:
        raise ParameterError(f"{key}={value}: no")

    wrapped = exit_on_parameter_error(config)
    with pytest.raises(SystemExit) as exited:
        wrapped("size", "big")
    assert exited.value.code == 1
    assert capfd.readouterr().err == "nbdkit: dedupblk: error: size=big: no\n"
    assert exit_on_parameter_error(lambda: 7)() == 7


# ---- the plugin file ------------------------------------------------------------------------


def test_plugin_file_binds_every_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("nbdkit")
    fake.set_error = FakeNbdkit().set_error  # type: ignore[attr-defined]
    fake.debug = FakeNbdkit().debug  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "tracebacklimit", 1000, raising=False)
    namespace = runpy.run_path(str(PLUGIN), run_name="__main__")
    assert namespace["API_VERSION"] == 2
    assert sys.tracebacklimit == 0
    callbacks = (
        "config", "config_complete", "thread_model", "get_ready", "after_fork", "cleanup", "open",
        "get_size", "block_size", "can_write", "can_flush", "can_trim", "can_zero",
        "can_fast_zero", "can_extents", "can_multi_conn", "can_fua", "is_rotational", "pread",
        "pwrite", "flush", "trim", "zero", "extents", "export_description", "dump_plugin",
    )  # fmt: skip
    for name in callbacks:
        assert callable(namespace[name]), name
    plugin = namespace["_plugin"]
    assert isinstance(plugin, NbdkitPlugin)
    assert namespace["pread"].__self__ is plugin
