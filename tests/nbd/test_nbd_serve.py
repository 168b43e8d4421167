"""`nbd_server.serve`, as `dedupblk serve --frontend nbd` runs it: the URI line, a private
socket, TCP on request, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from dedupblk.errors import InvalidRequest, NbdError
from dedupblk.nbd.launcher import nbd_uri, nbdkit_command, serve
from dedupblk.store import create_store

from .nbd_helpers import PAGE_SIZE, assert_clean, run

pytestmark = pytest.mark.nbd

SERVE = "import sys; from dedupblk.nbd.launcher import serve; sys.exit(serve(*{args}, **{kw}))"


@contextlib.contextmanager
def start_serve(*args: object, **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    code = SERVE.format(args=repr(args), kw=repr(kwargs))
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()  # leaving the `with` closes the pipes and waits


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> int:
    process.send_signal(signum)
    return process.wait(timeout=60)


def read_uri(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=60)
        raise AssertionError(f"serve exited {process.returncode}: {process.stderr.read()}")
    return line.rstrip("\n")


def write_and_read(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x17" * PAGE_SIZE, 0)
    assert h.pread(PAGE_SIZE, 0) == b"\x17" * PAGE_SIZE
    h.shutdown()


def test_foreground_unix_socket_is_private_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    sock = tmp_path / "s.sock"
    with start_serve(str(store), socket=str(sock), foreground=True) as process:
        uri = read_uri(process)
        assert uri == f"nbd+unix:///?socket={sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        write_and_read(uri)
        assert stop(process) == 0
    assert not sock.exists()
    assert_clean(store)


def test_default_socket_is_in_a_private_runtime_dir_and_sigint_stops(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    with start_serve(str(store), foreground=True) as process:
        uri = read_uri(process)
        path = Path(uri.removeprefix("nbd+unix:///?socket="))
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        write_and_read(uri)
        assert stop(process, signal.SIGINT) == 0
    assert_clean(store)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tcp_on_localhost_readonly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    port = free_port()
    with start_serve(str(store), port=port, readonly=True, foreground=True) as process:
        uri = read_uri(process)
        assert uri == f"nbd://localhost:{port}"
        export = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert export["is_read_only"] is True
        assert stop(process) == 0


def test_background_server_outlives_serve(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    sock = tmp_path / "bg.sock"
    with start_serve(str(store), socket=str(sock)) as process:
        uri = read_uri(process)
        assert process.wait(timeout=60) == 0
    pid = int(Path(f"{sock}.pid").read_text())
    try:
        write_and_read(uri)
    finally:
        os.kill(pid, signal.SIGTERM)
    run("sh", "-c", f"while kill -0 {pid} 2>/dev/null; do sleep 0.05; done", timeout=60)
    assert_clean(store)


def test_missing_store_fails_before_printing_a_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with start_serve(missing, socket=str(tmp_path / "x.sock"), foreground=True) as process:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1
    assert out == ""
    assert "no such store" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"socket": "/tmp/x.sock", "port": 10809}, "either a socket or a port"),
        ({"bind": "127.0.0.1"}, "--bind needs --port"),
        ({"port": 0}, "bad port 0"),
        ({"port": 70000}, "bad port 70000"),
        ({"port": 10809, "tls": "maybe"}, "bad TLS mode 'maybe'"),
        ({"port": 10809, "tls": "on", "tls_certificates": "/nonexistent"}, "does not exist"),
        ({"socket": "/tmp/" + "s" * 120}, "longer than 107 bytes"),
    ],
)
def test_serve_rejects_bad_options(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        serve(str(tmp_path / "store"), **kwargs)  # type: ignore[arg-type]


def test_uris() -> None:
    assert nbd_uri(socket="/run/a b.sock", tls=False) == "nbd+unix:///?socket=/run/a%20b.sock"
    assert nbd_uri(socket="/s", tls=True) == "nbds+unix:///?socket=/s"
    assert nbd_uri(port=10809, tls=False) == "nbd://localhost:10809"
    assert nbd_uri(port=10809, bind="0.0.0.0", tls=False) == "nbd://localhost:10809"
    assert nbd_uri(port=10809, bind="::1", tls=True) == "nbds://[::1]:10809"
    assert nbd_uri(port=1, bind="192.0.2.7", tls=False) == "nbd://192.0.2.7:1"


def test_command_passes_options_through() -> None:
    command = nbdkit_command(
        "/s", socket="/x.sock", port=None, bind=None, readonly=True, foreground=True,
        tls="require", tls_certificates="/certs", pidfile="/x.pid", extra_args=("-t", "4", "-v"),
    )  # fmt: skip
    assert {"--readonly", "--tls=require", "--foreground", "--exit-with-parent"} <= set(command)
    assert command[command.index("--tls-certificates") + 1] == "/certs"
    assert command[command.index("--unix") + 1] == "/x.sock"
    plugin = command.index("python")
    assert command[plugin - 3 : plugin] == ["-t", "4", "-v"]  # nbdkit options before the plugin
    assert command[plugin + 2 :] == ["store=/s", "readonly=true"]
    tcp = nbdkit_command(
        "/s", socket=None, port=10809, bind=None, readonly=False, foreground=False,
        tls=None, tls_certificates=None, pidfile="/x.pid",
    )  # fmt: skip
    assert tcp[tcp.index("--port") + 1 : tcp.index("--port") + 4] == [
        "10809",
        "--ipaddr",
        "localhost",
    ]
    assert "--foreground" not in tcp


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))  # bound, never listening: what a SIGKILLed server leaves
    with start_serve(str(store), socket=str(sock), foreground=True) as process:
        uri = read_uri(process)
        write_and_read(uri)
        with pytest.raises(NbdError, match="in use by another server"):
            serve(str(store), socket=str(sock))
        assert stop(process) == 0
