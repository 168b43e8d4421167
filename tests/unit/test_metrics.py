"""Metrics without a server process: the Prometheus exposition of a store's statistics (parsed
with prometheus_client's own parser), the store's commit and flush timings, the request and
error counting of both frontends' translation layers, and the counters file `stats` reads."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from dedupblk.cli import main
from dedupblk.counters import ServerCounters, check_address_free, parse_address
from dedupblk.errors import InvalidRequest, MetricsError, ServedError
from dedupblk.frontends import ublk
from dedupblk.metrics import ServerMetrics
from dedupblk.runtime import CountersWriter, counters_path, read_counters, write_record
from dedupblk.store import PAGE_SIZE, StoreFull, create_store, open_store, read_statistics
from dedupblk.ublk.abi import UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE
from tests.conftest import SMALL, rand_page
from tests.unit.test_nbdkit_adapter import FakeNbdkit, configured
from tests.unit.test_ublk_requests import Queue

P = PAGE_SIZE


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels, read by prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.mark.parametrize(
    ("text", "address"),
    [("9464", ("127.0.0.1", 9464)), ("0.0.0.0:9464", ("0.0.0.0", 9464)),
     ("localhost:1", ("localhost", 1)), ("[::1]:65535", ("::1", 65535))],
)  # fmt: skip
def test_a_metrics_address_is_localhost_unless_told(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "0", "65536", ":9464", "::1:9464", "host:", "host:port"])
def test_a_bad_metrics_address_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match="bad metrics address"):
        parse_address(text)


def test_a_taken_metrics_address_is_one_error() -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            check_address_free(("127.0.0.1", port))


def test_stats_in_prometheus_format_are_the_statistics(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    create_store(store, SMALL)
    with open_store(store) as opened:  # 3 copies of one page, a fill, 2 unique pages
        opened.write(0, rand_page(1) * 3 + b"\x22" * P + rand_page(2) + rand_page(3))
    _, usage = read_statistics(store)
    result = CliRunner().invoke(main, ["stats", store, "--format", "prometheus"])
    assert result.exit_code == 0, result.output
    found = samples(result.stdout)
    label = {"store": os.path.realpath(store)}
    assert value(found, "dedupblk_logical_bytes", **label) == 6 * P == usage.logical_bytes
    assert value(found, "dedupblk_stored_bytes", **label) == 3 * P == usage.stored_bytes
    assert value(found, "dedupblk_saved_bytes", **label) == 3 * P
    assert value(found, "dedupblk_device_size_bytes", **label) == SMALL
    assert value(found, "dedupblk_capacity_bytes", **label) == usage.capacity_bytes
    assert value(found, "dedupblk_mapped_pages", **label) == 5
    assert value(found, "dedupblk_same_filled_pages", **label) == 1
    assert value(found, "dedupblk_zero_pages", **label) == SMALL // P - 6
    assert value(found, "dedupblk_free_slots", **label) == usage.free_slots
    assert value(found, "dedupblk_metadata_bytes", **label) == usage.metadata_bytes
    assert not any(name.startswith("dedupblk_requests") for name, _ in found)  # not served


class Timings:
    def __init__(self) -> None:
        self.commits: list[float] = []
        self.flushes: list[float] = []

    def committed(self, seconds: float) -> None:
        self.commits.append(seconds)

    def flushed(self, seconds: float) -> None:
        self.flushes.append(seconds)


@pytest.mark.parametrize("group_commit", [True, False])
def test_the_store_times_each_commit_and_flush(store_dir: str, group_commit: bool) -> None:
    timings = Timings()
    with open_store(store_dir, observer=timings, group_commit=group_commit) as store:
        store.write(0, rand_page(1))
        store.commit()
        assert len(timings.commits) == 1 and not timings.flushes
        store.commit()  # nothing pending: no commit to time
        assert len(timings.commits) == 1
        store.write(P, rand_page(2))
        store.flush()
        assert len(timings.commits) == 2 and len(timings.flushes) == 1
    assert all(seconds >= 0 for seconds in timings.commits + timings.flushes)


def test_the_store_times_a_failed_commit(tmp_path: Path) -> None:
    create_store(tmp_path / "s", 64 * P, backend_size=4 * P)  # 3 data slots
    timings = Timings()
    with open_store(tmp_path / "s", observer=timings, group_commit=False) as store:
        for page in range(3):
            store.write(page * P, rand_page(page))
        store.commit()
        assert len(timings.commits) == 1
        with pytest.raises(StoreFull):
            store.write(3 * P, rand_page(3))  # no slot left: committed alone, and failed
        assert len(timings.commits) == 2
        store.flush()  # the writer heard of the failure: it is not reported twice


def test_the_nbdkit_adapter_counts_requests_and_errors(tmp_path: Path) -> None:
    plugin = configured(FakeNbdkit(), store=str(tmp_path / "s"), size="1M")
    plugin.get_ready()
    plugin.after_fork()
    try:
        handle = plugin.open(False)
        for page in range(3):
            plugin.pwrite(handle, memoryview(rand_page(page)), page * P, 0)
        plugin.pread(handle, memoryview(bytearray(P)), 0, 0)
        plugin.zero(handle, P, 0, 0)
        plugin.flush(handle, 0)
        with pytest.raises(InvalidRequest):
            plugin.pread(handle, memoryview(bytearray(P)), SMALL, 0)  # past the end: EINVAL
        counters = plugin._counters
        assert counters is not None and plugin._metrics is None  # no metrics=: no endpoint
        metrics = ServerMetrics(str(tmp_path / "s"), counters)
        metrics.watch(plugin.device.statistics)
        found = samples(generate(metrics))
        label = {"store": os.path.realpath(tmp_path / "s")}
        assert value(found, "dedupblk_requests_total", op="write", **label) == 3
        assert value(found, "dedupblk_requests_total", op="read", **label) == 2
        assert value(found, "dedupblk_requests_total", op="write_zeroes", **label) == 1
        assert value(found, "dedupblk_requests_total", op="flush", **label) == 1
        assert (
            value(found, "dedupblk_request_errors_total", op="read", errno="EINVAL", **label) == 1
        )
        assert value(found, "dedupblk_flush_seconds_count", **label) == 1
        assert value(found, "dedupblk_commit_seconds_count", **label) >= 1
        assert value(found, "dedupblk_stored_bytes", **label) == 2 * P  # page 0 was zeroed
    finally:
        plugin.cleanup()
    record = read_counters(str(tmp_path / "s"))  # this process, still alive, wrote it at cleanup
    assert record is not None
    assert record["requests"] == {"write": 3, "read": 2, "write_zeroes": 1, "flush": 1}
    assert record["errors"] == {"read": {"EINVAL": 1}}


def generate(metrics: ServerMetrics) -> str:
    from prometheus_client import generate_latest  # noqa: PLC0415

    return generate_latest(metrics.registry).decode()


def test_the_ublk_handler_counts_a_pass_and_its_failures(store_dir: str) -> None:
    counters = ServerCounters()
    metrics = ServerMetrics(store_dir, counters)
    with open_store(store_dir, group_commit=False, observer=counters) as store:
        metrics.watch(store.statistics)
        queue = Queue(store)
        queue.handler = ublk.RequestHandler(store, counters)
        queue.request(0, UBLK_IO_OP_WRITE, 0, P, rand_page(1))
        queue.request(1, UBLK_IO_OP_WRITE, P, P, rand_page(1))
        queue.request(2, UBLK_IO_OP_READ, 0, P)
        queue.request(3, UBLK_IO_OP_FLUSH, 0, 0)
        queue.request(4, UBLK_IO_OP_WRITE, SMALL, P, rand_page(2))  # past the end: EINVAL
        queue.request(5, 0xFE, 0, P)  # unknown: EOPNOTSUPP
        queue.run_pass([0, 1, 2, 3, 4, 5])
        found = samples(generate(metrics))
    label = {"store": os.path.realpath(store_dir)}
    assert value(found, "dedupblk_requests_total", op="write", **label) == 3
    assert value(found, "dedupblk_requests_total", op="read", **label) == 1
    assert value(found, "dedupblk_requests_total", op="flush", **label) == 1
    assert value(found, "dedupblk_requests_total", op="other", **label) == 1
    assert value(found, "dedupblk_request_errors_total", op="write", errno="EINVAL", **label) == 1
    assert (
        value(found, "dedupblk_request_errors_total", op="other", errno="EOPNOTSUPP", **label) == 1
    )
    assert value(found, "dedupblk_commit_seconds_count", **label) == 1  # one per pass
    assert value(found, "dedupblk_flush_seconds_count", **label) == 1
    assert value(found, "dedupblk_stored_bytes", **label) == P  # two writes of one page


def test_a_failed_commit_counts_an_error_for_each_request_it_covers(
    store_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = ServerCounters()
    with open_store(store_dir, group_commit=False) as store:
        queue = Queue(store)
        queue.handler = ublk.RequestHandler(store, counters)

        def full() -> None:
            raise StoreFull("no free slot")

        monkeypatch.setattr(store, "commit", full)
        queue.request(0, UBLK_IO_OP_WRITE, 0, P, rand_page(8))
        queue.request(1, UBLK_IO_OP_WRITE, P, P, rand_page(9))
        queue.request(2, UBLK_IO_OP_READ, 0, P)
        assert queue.run_pass([0, 1, 2]) == {0: -errno.ENOSPC, 1: -errno.ENOSPC, 2: P}
    assert counters.snapshot()["errors"] == {"write": {"ENOSPC": 2}}


def test_the_counters_file_is_private_atomic_and_follows_no_symlink(
    tmp_path: Path, runtime_dir: Path
) -> None:
    store = str(tmp_path / "s")
    path = counters_path(store)
    assert path.parent == runtime_dir
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path.symlink_to(victim)  # planted where the server writes
    writer = CountersWriter(store, lambda: {"requests": {"read": 7}})
    writer.start()
    writer.stop()
    assert victim.read_text() == "keep"
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in runtime_dir.iterdir()] == [path.name]  # no temporary left
    record = read_counters(store)
    assert record is not None and record["requests"] == {"read": 7}
    assert record["pid"] == os.getpid()


def test_the_counters_of_a_gone_server_are_not_shown(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(gone.stdout)
    write_record(counters_path(store), {"pid": pid, "started": "1", "requests": {"read": 1}})
    assert read_counters(store) is None
    # Our own pid, but another process's start time: a reused pid.
    write_record(counters_path(store), {"pid": os.getpid(), "started": "1", "requests": {}})
    assert read_counters(store) is None


def test_a_runtime_dir_others_can_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("DEDUPBLK_RUNTIME_DIR", str(shared))
    with pytest.raises(ServedError, match="not a private directory"):
        counters_path(str(tmp_path / "s"))
    assert read_counters(str(tmp_path / "s")) is None
    writer = CountersWriter(str(tmp_path / "s"), dict)  # serves on without the file
    writer.start()
    writer.stop()
    assert list(shared.iterdir()) == []
