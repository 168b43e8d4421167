"""The registry of served stores (`dedupblk.served`) and the `list` and `stop` commands over it:
one private record per server process, written whole, gone with its server, never confused
with a process that got a recycled pid."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dedupblk import served
from dedupblk.cli import main
from dedupblk.errors import ServedError


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry of this test's own, whichever user runs it."""
    monkeypatch.setattr(served, "ROOT_REGISTRY", tmp_path / "root-served")
    monkeypatch.delenv(served.RUNTIME_DIR_ENV)  # conftest's: this is the registry's own test
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return tmp_path / "root-served" if os.geteuid() == 0 else runtime / "dedupblk" / "served"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that a SIGTERM ends, standing in for a server."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_record_is_private_whole_and_named_for_its_store_and_process(
    registry: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    path = served.register(str(store), "ublk", device="/dev/ublkb3")
    assert path is not None and path.parent == registry
    assert stat.S_IMODE(registry.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    start_time = served.process_start_time(os.getpid())
    assert path.name.endswith(f"-{os.getpid()}-{start_time}.json")
    assert [p.name for p in registry.iterdir()] == [path.name]  # no temporary left behind
    record = json.loads(path.read_text())
    assert record == {
        "store": str(store), "frontend": "ublk", "pid": os.getpid(), "start_time": start_time,
        "socket": None, "uri": None, "device": "/dev/ublkb3",
    }  # fmt: skip
    assert served.entries() == [(path, served.Served(**record))]
    served.unregister(path)
    served.unregister(path)  # gone already: nothing to do
    assert served.entries() == []


def test_the_store_is_named_by_its_real_path(registry: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    served.register(str(tmp_path / "link"), "nbd", socket="/x.sock")
    (found,) = served.entries(str(tmp_path / "real"))
    assert found[1].store == str(tmp_path / "real")
    assert served.entries(str(tmp_path / "link")) == [found]
    assert served.entries(str(tmp_path / "other")) == []


def test_records_of_gone_processes_are_removed_when_read(
    registry: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = served.register(str(tmp_path), "nbd", pid=sleeper.pid, socket="/x.sock")
    assert path is not None
    assert [record.pid for _, record in served.entries()] == [sleeper.pid]
    sleeper.kill()
    sleeper.wait()
    assert served.entries() == []
    assert not path.exists()


def test_a_zombie_serves_nothing(
    registry: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = served.register(str(tmp_path), "nbd", pid=sleeper.pid, socket="/x.sock")
    sleeper.kill()
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert served.process_start_time(sleeper.pid) is None
    assert served.entries() == []
    assert path is not None and not path.exists()


def test_a_recycled_pid_is_not_the_server(
    registry: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """A record whose pid now names another process: gone, and that process is not signalled."""
    start_time = served.process_start_time(sleeper.pid)
    assert start_time is not None
    record = served.Served(str(tmp_path), "nbd", sleeper.pid, start_time - 1, socket="/x.sock")
    path = registry / f"x-{sleeper.pid}-{start_time - 1}.json"
    served.registry_dir()
    path.write_text(json.dumps(record.__dict__))
    assert not record.running()
    with pytest.raises(ServedError, match="no server serves"):
        served.stop(str(tmp_path))
    assert sleeper.poll() is None  # not signalled
    assert not path.exists()


def test_a_record_that_cannot_be_read_is_removed(registry: Path) -> None:
    served.registry_dir()
    for name, text in [("a.json", "{not json"), ("b.json", '{"store": "/x"}'), ("c.json", "[]")]:
        (registry / name).write_text(text)
    assert served.entries() == []
    assert list(registry.iterdir()) == []


@pytest.mark.parametrize("how", ["mode 0755", "a symlink"])
def test_a_registry_that_is_not_private_is_refused(
    registry: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry.parent.mkdir(parents=True, exist_ok=True)
    if how == "mode 0755":
        registry.mkdir(mode=0o755)
        registry.chmod(0o755)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        registry.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ServedError, match="not a private directory"):
        served.entries()
    # A server goes on serving without its record: a warning, no file written.
    with caplog.at_level(logging.WARNING):
        assert served.register(str(tmp_path), "nbd", socket="/x.sock") is None
    assert "not registered" in caplog.text and "not a private directory" in caplog.text
    if how == "a symlink":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_stop_sigterms_every_server_of_the_store_and_waits(
    registry: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    second = subprocess.Popen(["sleep", "600"])  # two read-only servers of one store
    other = subprocess.Popen(["sleep", "600"])  # another store's
    try:
        for pid in (sleeper.pid, second.pid):
            served.register(str(tmp_path / "store"), "nbd", pid=pid, socket=f"/{pid}.sock")
        served.register(str(tmp_path / "other"), "nbd", pid=other.pid, socket="/o.sock")
        stopped = served.stop(str(tmp_path / "store"), timeout=30)
        assert sorted(record.pid for record in stopped) == sorted([sleeper.pid, second.pid])
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
        assert second.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None
        assert [record.pid for _, record in served.entries()] == [other.pid]
    finally:
        for process in (second, other):
            process.kill()
            process.wait()


def test_stop_gives_up_after_its_timeout(registry: Path, tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
         " print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    ) as stubborn:  # fmt: skip
        try:
            assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
            path = served.register(str(tmp_path), "ublk", pid=stubborn.pid, device="/dev/ublkb0")
            with pytest.raises(ServedError, match=r"still runs 0.2 s after SIGTERM \(swapoff"):
                served.stop(str(tmp_path), timeout=0.2)
            assert stubborn.poll() is None
            assert path is not None and path.exists()  # it still serves
        finally:
            stubborn.kill()


# ---- the commands ---------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_list_and_stop_commands(
    registry: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    assert invoke("list") == (0, "no served stores\n", "")
    assert invoke("list", "--json") == (0, "[]\n", "")
    store = tmp_path / "store"
    served.register(str(store), "nbd", pid=sleeper.pid, socket="/s.sock", uri="nbd+unix:///x")
    served.register(str(tmp_path / "swap"), "ublk", device="/dev/ublkb7")
    code, out, _ = invoke("list")
    assert code == 0
    assert out.splitlines() == [
        f"{store}  nbd  pid {sleeper.pid}  /s.sock",
        f"{tmp_path / 'swap'}  ublk  pid {os.getpid()}  /dev/ublkb7",
    ]
    code, out, _ = invoke("list", "--json")
    listed = json.loads(out)
    assert [(r["store"], r["frontend"], r["pid"], r["socket"], r["device"]) for r in listed] == [
        (str(store), "nbd", sleeper.pid, "/s.sock", None),
        (str(tmp_path / "swap"), "ublk", os.getpid(), None, "/dev/ublkb7"),
    ]
    assert invoke("stop", str(store)) == (0, f"stopped {store} (nbd, pid {sleeper.pid})\n", "")
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    code, out, err = invoke("stop", str(store))
    assert (code, out) == (1, "")
    assert err == f"dedupblk: no server serves {store} (see dedupblk list)\n"
