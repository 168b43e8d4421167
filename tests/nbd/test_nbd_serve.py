"""`nbd_server.serve`, as `dedupblk serve --frontend nbd` runs it: the URI line, a private
socket, TCP only with TLS or on loopback when asked in words, no file written through another
user's symlink, a failed serve that leaves a running one alone, and a clean stop on SIGTERM even
with an idle client connected."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from dedupblk import served
from dedupblk.errors import InvalidRequest, NbdError
from dedupblk.nbd import launcher
from dedupblk.nbd.launcher import (
    check_exposure,
    is_loopback,
    nbd_uri,
    nbdkit_command,
    runtime_dir,
    serve,
)
from dedupblk.store import check_store, create_store, open_store

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


def pidfile_from(process: subprocess.Popen[str]) -> Path:
    """The pidfile a background serve named on stderr (after it exited)."""
    assert process.stderr is not None
    err = process.stderr.read()
    prefix = "dedupblk: nbdkit pid file "
    lines = [line.removeprefix(prefix) for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return Path(lines[0])


def stop_background(pid: int, pidfile: Path) -> None:
    """SIGTERM a background nbdkit, wait for it to go, and remove the pidfile it leaves."""
    os.kill(pid, signal.SIGTERM)
    run("sh", "-c", f"while kill -0 {pid} 2>/dev/null; do sleep 0.05; done", timeout=60)
    pidfile.unlink(missing_ok=True)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dedupblk.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert result.returncode == code, result
    assert result.stdout == "", result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("dedupblk: ") and message in result.stderr, result.stderr


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
    with start_serve(
        str(store), port=port, readonly=True, foreground=True,
        tcp_without_tls_for_every_local_user=True,
    ) as process:  # fmt: skip
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
        pidfile = pidfile_from(process)
    pid = int(pidfile.read_text())
    try:
        write_and_read(uri)
    finally:
        stop_background(pid, pidfile)
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
        ({"port": 10809, "tls_psk": "/nonexistent"}, "PSK file /nonexistent does not exist"),
        ({"tcp_without_tls_for_every_local_user": True}, "needs --port"),
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
    psk = nbdkit_command(
        "/s", socket=None, port=1, bind=None, readonly=False, foreground=False, tls=None,
        tls_certificates=None, tls_psk="/keys.psk", pidfile="/x.pid", control_fd=5,
    )  # fmt: skip
    assert {"--tls=require", "--tls-psk=/keys.psk"} <= set(psk)  # nbdkit alone: --tls=on
    assert psk[-1] == "control-fd=5"
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


# -- TCP exposure ------------------------------------------------------------------------------


def write_psk(tmp_path: Path) -> Path:
    """A PSK file for user alice, as psktool would write it: a 0600 file in a 0700 directory."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    psk = keys / "keys.psk"
    psk.touch(mode=0o600)
    psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    return psk


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "without TLS: every local user could read and write the export"),
        (["--bind", "127.0.0.1"], "without TLS: every local user could read and write"),
        (["--tls", "on", "--tls-psk", "{psk}"], "--tls=on lets clients go without TLS"),
        (["--bind", "0.0.0.0", "--tcp-without-tls-for-every-local-user"],
         "refusing to serve 0.0.0.0 port"),
        (["--bind", "::", "--tcp-without-tls-for-every-local-user"], "refusing to serve :: port"),
        (["--bind", "0.0.0.0", "--tls", "off", "--tls-psk", "{psk}",
          "--tcp-without-tls-for-every-local-user"], "refusing to serve 0.0.0.0 port"),
    ],
)  # fmt: skip
def test_tcp_without_tls_is_refused_in_one_line(
    tmp_path: Path, options: list[str], message: str
) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    psk = write_psk(tmp_path)
    args = [option.format(psk=psk) for option in options]
    # --foreground: a serve that is not refused does not return, and times out the test
    result = cli("serve", str(store), "--port", str(free_port()), "--foreground", *args)
    assert_one_line(result, 2, message)


def test_tcp_without_tls_on_loopback_when_asked_in_words(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    port = free_port()
    with start_serve(
        str(store), port=port, bind="127.0.0.1", foreground=True,
        tcp_without_tls_for_every_local_user=True,
    ) as process:  # fmt: skip
        uri = read_uri(process)
        assert uri == f"nbd://127.0.0.1:{port}"
        write_and_read(uri)
        assert stop(process) == 0


def test_a_psk_export_requires_tls_and_serves_nbdinfo(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    psk = write_psk(tmp_path)
    port = free_port()
    with start_serve(str(store), port=port, tls_psk=str(psk), foreground=True) as process:
        assert read_uri(process) == f"nbds://localhost:{port}"
        info = run("nbdinfo", f"nbds://alice@localhost:{port}/?tls-psk-file={psk}").stdout
        assert "with TLS" in info
        assert "export-size: 1048576" in info
        plain = subprocess.run(["nbdinfo", f"nbd://localhost:{port}"],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert plain.returncode != 0, plain.stdout  # nbdkit alone (--tls-psk) would serve it
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)  # the PSK file named in the URI
        h.connect_uri(f"nbds://alice@localhost:{port}/?tls-psk-file={psk}")
        h.pwrite(b"\x17" * PAGE_SIZE, 0)
        assert h.pread(PAGE_SIZE, 0) == b"\x17" * PAGE_SIZE
        h.shutdown()
        assert stop(process) == 0
    assert_clean(store)


def test_which_tcp_exposures_are_allowed() -> None:
    def allowed(**kw: object) -> bool:
        given = {"port": 1, "bind": None, "tls": None, "credentials": False,
                 "tcp_without_tls_for_every_local_user": False} | kw  # fmt: skip
        try:
            check_exposure(**given)  # type: ignore[arg-type]
        except InvalidRequest:
            return False
        return True

    assert allowed(port=None)  # a Unix socket: 0600 in a private directory
    assert allowed(credentials=True)  # TLS required of every client, on any address
    assert allowed(credentials=True, bind="0.0.0.0")
    assert allowed(tls="require", bind="192.0.2.7")  # nbdkit's own certificate directories
    assert allowed(tcp_without_tls_for_every_local_user=True)
    assert allowed(tcp_without_tls_for_every_local_user=True, bind="::1")
    assert not allowed()
    assert not allowed(credentials=True, tls="on")
    assert not allowed(credentials=True, tls="off", bind="localhost")
    assert not allowed(tcp_without_tls_for_every_local_user=True, bind="192.0.2.7")
    assert not allowed(tcp_without_tls_for_every_local_user=True, bind="0.0.0.0", tls="on")
    assert is_loopback(None) and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.7")


# -- symlinks and other users' directories -----------------------------------------------------

NOBODY = 65534


def test_no_file_is_written_through_a_planted_symlink(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    target = tmp_path / "target"
    target.write_text("precious\n")
    target.chmod(0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may add a name
    sock = shared / "s.sock"
    # Where a pid file beside the socket would go, and where nbdkit will bind, another user's
    # symlinks to a file of ours. The first must not be followed, the second refuses the socket.
    os.symlink(target, f"{sock}.pid")
    os.symlink(target, shared / "t.sock")
    if os.geteuid() == 0:
        os.lchown(f"{sock}.pid", NOBODY, NOBODY)
        os.lchown(shared / "t.sock", NOBODY, NOBODY)
    with start_serve(str(store), socket=str(sock)) as process:  # in the background
        uri = read_uri(process)
        assert process.wait(timeout=60) == 0
        pidfile = pidfile_from(process)
    pid = int(pidfile.read_text())
    try:
        assert pidfile.parent == runtime_dir()
        assert stat.S_IMODE(pidfile.parent.lstat().st_mode) == 0o700
        write_and_read(uri)
    finally:
        stop_background(pid, pidfile)
    refused = cli("serve", str(store), "--socket", str(shared / "t.sock"), "--foreground")
    assert_one_line(refused, 2, "is a symlink")
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # no chmod through the symlink either
    assert os.readlink(f"{sock}.pid") == str(target)


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_a_socket_directory_another_user_can_change_is_refused(tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    directory = tmp_path / "d"
    directory.mkdir()
    if how == "writable by others":
        directory.chmod(0o777)  # not sticky: others may rename or remove our socket
    elif os.geteuid() == 0:
        os.chown(directory, NOBODY, NOBODY)
    else:
        pytest.skip("giving a directory to another user needs root")
    result = cli("serve", str(store), "--socket", str(directory / "s.sock"), "--foreground")
    assert_one_line(result, 2, "could replace the socket")
    assert list(directory.iterdir()) == []


# -- a failed serve and a running one ----------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["socket", "port"])
def test_a_failed_serve_touches_nothing_of_a_running_one(tmp_path: Path, endpoint: str) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    create_store(first, 1 << 20)
    create_store(second, 1 << 20)
    sock, port = tmp_path / "s.sock", free_port()
    kwargs: dict[str, object] = (
        {"socket": str(sock)} if endpoint == "socket"
        else {"port": port, "tcp_without_tls_for_every_local_user": True}
    )  # fmt: skip
    args = (
        ["--socket", str(sock)] if endpoint == "socket"
        else ["--port", str(port), "--tcp-without-tls-for-every-local-user"]
    )  # fmt: skip
    with start_serve(str(first), **kwargs) as process:  # in the background
        uri = read_uri(process)
        assert process.wait(timeout=60) == 0
        pidfile = pidfile_from(process)
    pid_text = pidfile.read_text()
    pid = int(pid_text)
    socket_inode = sock.stat().st_ino if endpoint == "socket" else None
    ((record_path, record),) = served.entries(str(first))
    record_text = record_path.read_text()
    try:
        result = cli("serve", str(second), *args, "--foreground")
        assert_one_line(result, 1, "in use by another server")
        # the same store on another socket: refused by the store's lock, once nbdkit has started
        result = cli("serve", str(first), "--socket", str(tmp_path / "other.sock"), "--foreground")
        assert result.returncode == 1 and "in use by another process" in result.stderr, result
        assert served.entries(str(first)) == [(record_path, record)]
        assert record_path.read_text() == record_text
        assert record.pid == pid
        if endpoint == "port":
            # nbdkit finding the port taken itself (another server took it after the check)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(launcher, "_refuse_port_in_use", lambda bind, port: None)
                assert serve(str(second), foreground=True, **kwargs) == 1  # type: ignore[arg-type]
        assert pidfile.read_text() == pid_text
        if socket_inode is not None:
            assert sock.stat().st_ino == socket_inode
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        write_and_read(uri)
    finally:
        stop_background(pid, pidfile)
    assert_clean(first)


# -- SIGTERM with an idle client ---------------------------------------------------------------

STOP_BOUND = 10.0  # seconds serve may take to exit after SIGTERM: a bound, not a measurement


def test_sigterm_with_an_idle_client_closes_the_store_and_exits(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    flushed, unflushed = b"\x31" * PAGE_SIZE, b"\x32" * PAGE_SIZE
    server = subprocess.Popen(
        [sys.executable, "-m", "dedupblk.cli", "serve", str(store),
         "--socket", str(tmp_path / "s.sock"), "--foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = nbd.NBD()
    try:
        client.connect_uri(read_uri(server))
        client.pwrite(flushed, 0)
        client.flush()
        client.pwrite(unflushed, PAGE_SIZE)  # acknowledged, not flushed: the close commits it
        # Idle: let nbdkit's connection thread get back to its blocking read. A SIGTERM that
        # comes before it does is seen between requests, and nbdkit then stops by itself.
        time.sleep(0.5)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        # the client stays connected and idle; nbdkit alone would wait for it forever
        assert server.wait(timeout=STOP_BOUND) == 0, server.stderr.read() if server.stderr else ""
        assert time.monotonic() - started < STOP_BOUND
    finally:
        if server.poll() is None:
            server.kill()
        del client  # libnbd closes the connection: an nbdkit left waiting for it ends
        server.communicate(timeout=60)
    checked = cli("check", str(store))
    assert checked.returncode == 0 and checked.stdout.startswith("clean"), checked
    result = check_store(store)
    assert not result.problems, result.problems
    with open_store(store) as opened:  # the lock is free: it opens for writing
        assert opened.read(0, 2 * PAGE_SIZE) == flushed + unflushed
