"""`dedupblk list` and `dedupblk stop STORE` with real nbdkit servers started by `dedupblk serve`,
in the background and in the foreground."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

from dedupblk import served
from dedupblk.store import create_store

from .nbd_helpers import assert_clean
from .test_nbd_serve import assert_one_line, cli, pidfile_from, read_uri, write_and_read

pytestmark = pytest.mark.nbd


def listed(store: Path) -> list[dict[str, object]]:
    result = cli("list", "--json")
    assert result.returncode == 0, result
    return [record for record in json.loads(result.stdout) if record["store"] == str(store)]


def serve_in_background(store: Path, sock: Path) -> tuple[str, int]:
    """`dedupblk serve` without --foreground: the URI and nbdkit's pid."""
    with subprocess.Popen(
        [sys.executable, "-m", "dedupblk.cli", "serve", str(store), "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        uri = read_uri(process)
        assert process.wait(timeout=60) == 0
        pid = int(pidfile_from(process).read_text())
    return uri, pid


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60  # a bound on a hang, not a measurement
    while served.process_start_time(pid) is not None:
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)


def test_a_background_server_is_listed_and_stopped(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    sock = tmp_path / "s.sock"
    uri, pid = serve_in_background(store, sock)
    try:
        write_and_read(uri)
        (record,) = listed(store)
        assert (record["frontend"], record["pid"], record["socket"], record["uri"]) == (
            "nbd", pid, str(sock), uri,
        )  # fmt: skip
        text = cli("list").stdout.splitlines()
        assert f"{store}  nbd  pid {pid}  {sock}" in text
    finally:
        stopped = cli("stop", str(store))
    assert stopped.returncode == 0, stopped
    assert stopped.stdout == f"stopped {store} (nbd, pid {pid})\n"
    assert served.process_start_time(pid) is None  # it has exited
    assert listed(store) == []
    assert served.entries(str(store)) == []  # its record is gone too
    assert_clean(store)
    assert_one_line(cli("stop", str(store)), 1, f"no server serves {store}")


def test_a_foreground_server_is_listed_as_serve_and_stops_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    with subprocess.Popen(
        [sys.executable, "-m", "dedupblk.cli", "serve", str(store), "--foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            uri = read_uri(process)
            client = nbd.NBD()  # an idle client: the foreground serve ends it itself
            client.connect_uri(uri)
            client.pwrite(b"\x42" * 4096, 0)
            (record,) = listed(store)
            assert (record["pid"], record["uri"]) == (process.pid, uri)
            stopped = cli("stop", str(store), "--timeout", "30")
            assert stopped.returncode == 0, stopped
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
    del client
    assert listed(store) == []
    assert_clean(store)


def test_stop_is_bounded_by_its_timeout(tmp_path: Path) -> None:
    """A background nbdkit waits for an idle client (nbdkit 1.32 has no timeout): `stop` says
    so after --timeout, and succeeds once the client has gone."""
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    uri, pid = serve_in_background(store, tmp_path / "s.sock")
    client = nbd.NBD()
    try:
        client.connect_uri(uri)
        time.sleep(0.5)  # back in its blocking read, where SIGTERM does not reach it
        started = time.monotonic()
        result = cli("stop", str(store), "--timeout", "1")
        assert_one_line(result, 1, f"nbd server pid {pid} of {store} still runs 1 s after SIGTERM")
        assert "idle clients" in result.stderr
        assert time.monotonic() - started < 30
        assert listed(store) != []
    finally:
        del client  # gone: the nbdkit told to stop now exits by itself
    wait_gone(pid)
    assert listed(store) == []
    assert_clean(store)


def test_a_sigkilled_server_is_dropped_from_the_list(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    _, pid = serve_in_background(store, tmp_path / "s.sock")
    assert [record["pid"] for record in listed(store)] == [pid]
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert listed(store) == []
    assert served.entries(str(store)) == []
