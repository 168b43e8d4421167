"""`dedupblk serve --frontend nbd`: run nbdkit with dedupblk's plugin on a store.

nbdkit embeds Debian's /usr/bin/python3, which sees neither this package nor the venv's
site-packages unless told: `serve` sets PYTHONPATH (the directory holding `dedupblk`, then this
interpreter's site-packages) and puts this interpreter's `bin/` first on PATH. It waits until
nbdkit has written its pidfile (nbdkit does that once its socket is listening), then prints the
NBD URI alone on one line of stdout.

Exposure: by default a Unix socket of mode 0600 in a per-user runtime directory of mode 0700.
TCP only when a port is given: with TLS (certificates or a PSK file, then required of every
client) on any address; without TLS only on a loopback address, and only when the caller says
that every local user may read and write the export (anyone who can connect can).

Nothing is written where another user could plant a symlink: pidfiles live in the private runtime
directory, a socket elsewhere only in a directory no other user can change (see
`safe_socket_path`), and the socket is chmod'ed without following a symlink. A serve that fails
to start touches nothing of a running server: nbdkit writes its pidfile under a name of this
process's own, renamed to the shared name only once this nbdkit is listening.

In the foreground `serve` forwards SIGTERM/SIGINT to nbdkit and closes the plugin's control pipe
(`control-fd=`): nbdkit finishes its requests, the plugin closes the store (flushed and marked
clean) and ends nbdkit even with idle clients connected, which nbdkit alone would wait for.
`serve` then returns nbdkit's exit code. In the background nbdkit forks itself and `serve` returns
0 once the URI is printed; stop the server with `dedupblk stop STORE` or `kill $(cat PIDFILE)`
(the pidfile path is printed on stderr; nbdkit there waits for its clients to disconnect).

`serve --run CMD` is nbdkit's captive mode (`nbdkit --run`, server/captive.c): nbdkit runs
`/bin/sh -c CMD` once it listens, with the shell variables `$uri` (and `$nbd`, `$exportname`,
`$port`, `$unixsocket`, `$tls`) set before CMD (not exported: pass them on explicitly), then
stops the server and exits with CMD's status, 128+N if signal N killed it. `serve` prints no
URI then (its stdout is the command's), and runs nbdkit in serve's process group, not a new
one, with serve's stdin: an interactive command has the terminal, and a ^C reaches it too. The
socket, the exposure rules and the clean stop are those of a foreground serve. A command that
leaves a client connected holds the stop until that client goes, as under nbdkit alone;
SIGTERM to `serve` ends it anyway.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import signal
import socket as socketlib
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from dedupblk import served
from dedupblk.counters import format_address
from dedupblk.errors import InvalidRequest, NbdError

PLUGIN = Path(__file__).resolve().parents[1] / "frontends" / "nbdkit_plugin.py"
# The directory that holds the `dedupblk` package (a checkout's root, or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
NBDKIT = "nbdkit"
TLS_MODES = ("off", "on", "require")
READY_POLL_SECONDS = 0.02
# nbdkit binds its socket right after the plugin's get_ready; a store's open is bounded by its
# LMDB open, so a server that is not up by then is stuck.
READY_TIMEOUT_SECONDS = 60.0
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", "*"})  # noqa: S104  (recognised, not bound)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def runtime_dir() -> Path:
    """A private (0700) per-user directory for sockets and pidfiles."""
    return served.user_runtime_dir()


def default_socket(store_path: str) -> Path:
    """`RUNTIME/<store name>-<hash of its absolute path>.sock`: stable per store, short enough
    for a Unix socket path."""
    absolute = os.path.abspath(store_path)
    return runtime_dir() / f"{_short_name(absolute, 'store')}-{_digest(absolute)}.sock"


def pidfile_for(*, socket: str | None, port: int | None) -> Path:
    """The pidfile of the server on ``socket`` (an absolute, resolved path) or TCP ``port``:
    always in the private runtime directory, never beside a socket a user chose."""
    if socket is None:
        return runtime_dir() / f"nbd-{port}.pid"
    name = _short_name(socket, "socket").removesuffix(".sock")
    return runtime_dir() / f"{name}-{_digest(socket)}.pid"


def _short_name(path: str, default: str) -> str:
    return (os.path.basename(path.rstrip("/")) or default)[:32]


def _digest(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


def safe_socket_path(socket: str) -> str:
    """``socket`` with its directory resolved once, if no other user can change that directory.

    nbdkit creates the socket, and `serve` chmods and at last removes it, by name: another user who
    can create, rename or remove entries in any directory on the way could put a symlink or a
    socket of their own there. So every directory from the root down to the socket's must be owned
    by root or this user, and be writable by no one else unless it is sticky (like /tmp: there
    others may add names but not remove or rename ours). The path returned has no symlinks in its
    directory part, so nothing resolves it differently later. The socket's own name must not
    exist as a symlink (nbdkit's bind would refuse it anyway; the message here says why).
    """
    absolute = os.path.abspath(socket)
    name = os.path.basename(absolute)
    directory = os.path.realpath(os.path.dirname(absolute))
    uid = os.geteuid()
    node = directory
    while True:
        try:
            info = os.stat(node)
        except OSError as exc:
            raise InvalidRequest(f"socket directory {node}: {exc.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidRequest(f"socket directory {node} is not a directory")
        if info.st_uid not in (0, uid):
            raise InvalidRequest(
                f"refusing socket {socket}: {node} belongs to uid {info.st_uid}, who could "
                "replace the socket; use a directory of your own"
            )
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise InvalidRequest(
                f"refusing socket {socket}: {node} is writable by other users (and not sticky), "
                "who could replace the socket; use a directory of your own"
            )
        if node == "/":
            break
        node = os.path.dirname(node)
    path = os.path.join(directory, name)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise InvalidRequest(f"refusing socket {path}: it is a symlink")
    return path


def is_loopback(host: str | None) -> bool:
    """Whether every address ``host`` (None: nbdkit's default here, localhost) names is a
    loopback address; False for a name that does not resolve."""
    if host is None:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        found = socketlib.getaddrinfo(host, None, type=socketlib.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in found}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses
    )


def nbd_uri(
    *, socket: str | None = None, port: int | None = None, bind: str | None = None, tls: bool
) -> str:
    if socket is not None:
        scheme = "nbds+unix" if tls else "nbd+unix"
        return f"{scheme}:///?socket={urllib.parse.quote(socket, safe='/')}"
    host = bind or "localhost"
    if host in WILDCARD_ADDRESSES:  # a URI needs an address to connect to
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}"


def plugin_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment nbdkit needs to import dedupblk and this interpreter's packages."""
    env = dict(os.environ if base is None else base)
    paths = [str(PACKAGE_ROOT)]
    for key in ("purelib", "platlib"):
        site_dir = sysconfig.get_paths()[key]
        if site_dir not in paths:
            paths.append(site_dir)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    return env


def tls_mode(tls: str | None, *, credentials: bool) -> str | None:
    """The ``--tls`` nbdkit gets: as asked, else ``require`` when credentials are given (nbdkit
    alone would serve clients without TLS too: ``off`` with certificates, ``on`` with a PSK)."""
    if tls is None and credentials:
        return "require"
    return tls


def nbdkit_command(
    store_path: str,
    *,
    socket: str | None,
    port: int | None,
    bind: str | None,
    readonly: bool,
    foreground: bool,
    tls: str | None,
    tls_certificates: str | None,
    pidfile: str,
    tls_psk: str | None = None,
    control_fd: int | None = None,
    extra_args: Sequence[str] = (),
    metrics: tuple[str, int] | None = None,
    run: str | None = None,
) -> list[str]:
    command = [NBDKIT, "--pidfile", pidfile]
    if foreground:
        # --exit-with-parent: if `serve` dies without forwarding a signal, nbdkit goes too.
        command += ["--foreground", "--exit-with-parent"]
    if socket is not None:
        command += ["--unix", socket]
    else:
        command += ["--port", str(port), "--ipaddr", bind or "localhost"]
    if readonly:
        command.append("--readonly")
    mode = tls_mode(tls, credentials=tls_certificates is not None or tls_psk is not None)
    if mode is not None:
        command.append(f"--tls={mode}")
    if tls_certificates is not None:
        command += ["--tls-certificates", os.path.abspath(tls_certificates)]
    if tls_psk is not None:
        command.append(f"--tls-psk={os.path.abspath(tls_psk)}")
    if run is not None:
        command += ["--run", run]
    command += list(extra_args)
    command += ["python", str(PLUGIN), f"store={os.path.abspath(store_path)}"]
    if readonly:
        command.append("readonly=true")
    if control_fd is not None:
        command.append(f"control-fd={control_fd}")
    if metrics is not None:
        command.append(f"metrics={format_address(metrics)}")  # served by the plugin's process
    return command


def check_exposure(
    *,
    port: int | None,
    bind: str | None,
    tls: str | None,
    credentials: bool,
    tcp_without_tls_for_every_local_user: bool,
) -> None:
    """Refuse TCP that serves clients without TLS, unless on loopback and explicitly accepted.

    Over TCP, anyone who can connect can read and write the export: on a loopback address that is
    every local user, on any other address anyone who can reach the port. Without TLS there is
    no check of who connects, so the first is allowed only when asked for in words, the second
    never. "Without TLS" includes ``--tls=on``, which lets a client choose not to use it.
    """
    if tcp_without_tls_for_every_local_user and port is None:
        raise InvalidRequest("--tcp-without-tls-for-every-local-user needs --port")
    if port is None or tls_mode(tls, credentials=credentials) == "require":
        return
    if not is_loopback(bind):
        raise InvalidRequest(
            f"refusing to serve {bind} port {port} without TLS: anyone who can reach it could "
            "read and write the store; give --tls-psk FILE or --tls-certificates DIR"
            + (" (--tls=on lets clients go without TLS)" if tls == "on" else "")
        )
    if not tcp_without_tls_for_every_local_user:
        raise InvalidRequest(
            f"refusing TCP port {port} without TLS: every local user could read and write the "
            "export; give --tls-psk FILE or --tls-certificates DIR, or say "
            "--tcp-without-tls-for-every-local-user"
            + (" (--tls=on lets clients go without TLS)" if tls == "on" else "")
        )


def serve(
    store_path: str,
    *,
    socket: str | None = None,
    port: int | None = None,
    bind: str | None = None,
    readonly: bool = False,
    foreground: bool = False,
    tls: str | None = None,
    tls_certificates: str | None = None,
    tls_psk: str | None = None,
    tcp_without_tls_for_every_local_user: bool = False,
    extra_args: Sequence[str] = (),
    metrics: tuple[str, int] | None = None,
    run: str | None = None,
) -> int:
    """Serve ``store_path`` over NBD with nbdkit; print the URI once it accepts connections.

    With ``metrics`` (address, port), the plugin serves Prometheus metrics over HTTP there.
    With ``run``, nbdkit's captive mode instead (``nbdkit --run``, see the module docstring):
    no URI is printed, and the exit code is the command's.

    Returns the exit code for the CLI: nbdkit's own in the foreground (0 after a clean stop by
    SIGTERM/SIGINT), 0 once the background server is up, and nbdkit's nonzero code if it failed
    to start (its error is already on stderr). Raises InvalidRequest for bad or unsafe options
    and NbdError when nbdkit cannot be started or its socket or port is taken.

    Once it serves, the server is in the registry of `dedupblk.served` (``dedupblk list``): in
    the foreground as this process, which removes the record when nbdkit has stopped; in the
    background as nbdkit, whose record is removed by whoever finds it gone.
    """
    if run is not None and not run.strip():
        raise InvalidRequest("--run needs a command")
    captive = run is not None
    foreground = foreground or captive  # nbdkit --run never forks into the background
    if socket is not None and port is not None:
        raise InvalidRequest("give either a socket or a port, not both")
    if bind is not None and port is None:
        raise InvalidRequest("--bind needs --port (a Unix socket has no address)")
    if port is not None and not 0 < port < 65536:
        raise InvalidRequest(f"bad port {port}: must be 1-65535")
    if tls is not None and tls not in TLS_MODES:
        raise InvalidRequest(f"bad TLS mode {tls!r}: use one of {', '.join(TLS_MODES)}")
    if tls_certificates is not None and not os.path.isdir(tls_certificates):
        raise InvalidRequest(f"TLS certificates directory {tls_certificates} does not exist")
    if tls_psk is not None and not os.path.isfile(tls_psk):
        raise InvalidRequest(f"TLS PSK file {tls_psk} does not exist")
    if tls_psk is not None and tls_certificates is not None:
        raise InvalidRequest("give either --tls-certificates or --tls-psk, not both")
    credentials = tls_certificates is not None or tls_psk is not None
    check_exposure(
        port=port, bind=bind, tls=tls, credentials=credentials,
        tcp_without_tls_for_every_local_user=tcp_without_tls_for_every_local_user,
    )  # fmt: skip
    if port is None:
        socket = safe_socket_path(socket) if socket is not None else str(default_socket(store_path))
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise InvalidRequest(f"socket path {socket} is longer than {UNIX_PATH_MAX} bytes")
        _remove_stale_socket(socket)
    else:
        _refuse_port_in_use(bind, port)
    pidfile = pidfile_for(socket=socket, port=port)
    # nbdkit writes this one; only a server that got its socket renames it to `pidfile`.
    starting = pidfile.with_name(f"{pidfile.name}.starting-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        starting.unlink()  # a crashed serve of an earlier process with our pid
    # The plugin's control pipe (foreground only: a background server outlives `serve`).
    control_read, control_write = os.pipe() if foreground else (None, None)
    control = _ControlPipe(control_write)
    command = nbdkit_command(
        store_path,
        socket=socket,
        port=port,
        bind=bind,
        readonly=readonly,
        foreground=foreground,
        tls=tls,
        tls_certificates=tls_certificates,
        tls_psk=tls_psk,
        pidfile=str(starting),
        control_fd=control_read,
        extra_args=extra_args,
        metrics=metrics,
        run=run,
    )
    tls_used = tls_mode(tls, credentials=credentials) in ("on", "require")
    uri = nbd_uri(socket=socket, port=port, bind=bind, tls=tls_used)
    record: Path | None = None
    try:
        try:
            process = subprocess.Popen(
                command,
                env=plugin_environment(),
                # A captive command gets this terminal, as under nbdkit alone.
                stdin=None if captive else subprocess.DEVNULL,
                # Its own process group (unless captive): a terminal's ^C reaches `serve`, which
                # forwards it once.
                process_group=None if captive else 0,
                pass_fds=() if control_read is None else (control_read,),
            )
        except FileNotFoundError:
            raise NbdError(f"{NBDKIT} is not installed (apt-get install nbdkit)") from None
        finally:
            if control_read is not None:
                os.close(control_read)
        with _forward_signals(process, control):
            if not _wait_ready(process, str(starting), foreground=foreground):
                code = process.wait()
                return code if code > 0 else 1
            os.replace(starting, pidfile)
            # A captive command may be done already, and nbdkit gone with it.
            if socket is not None and not (captive and process.poll() is not None):
                # nbdkit makes its socket 0755 whatever our umask. Until this chmod, others still
                # cannot connect: connect() needs write permission.
                _make_private(process, socket)
            if not captive:  # a captive command has $uri; this stdout is the command's
                print(uri, flush=True)
            if not foreground:
                print(f"dedupblk: nbdkit pid file {pidfile}", file=sys.stderr, flush=True)
                nbdkit_pid = _pid_in(pidfile)
                if nbdkit_pid is not None:
                    served.register(store_path, "nbd", pid=nbdkit_pid, socket=socket, uri=uri)
                return 0
            record = served.register(store_path, "nbd", socket=socket, uri=uri)
            code = _exit_code(process.wait())
    finally:
        served.unregister(record)
        control.close()
        with contextlib.suppress(FileNotFoundError):
            starting.unlink()
    # nbdkit leaves its socket and pidfile behind; a foreground server's are gone with it.
    for leftover in (socket, pidfile):
        if leftover is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return code


def _pid_in(pidfile: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(pidfile.read_text())
    return None


def _make_private(process: subprocess.Popen[bytes], socket: str) -> None:
    """chmod 0600 the socket nbdkit made, never through a symlink put in its place."""
    try:
        os.chmod(socket, 0o600, follow_symlinks=False)
    except (NotImplementedError, OSError) as exc:  # NotImplementedError: it is a symlink
        process.terminate()
        process.wait()
        raise NbdError(f"{socket} was replaced while nbdkit started ({exc})") from None


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a server that was killed; refuse one that is still served."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidRequest(f"{path} exists and is not a socket")
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)  # nobody listens: a killed server's leftover
        except OSError as exc:
            raise NbdError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
        return
    except OSError as exc:
        raise NbdError(f"{path} exists and cannot be probed: {exc.strerror}") from None
    finally:
        probe.close()
    raise NbdError(f"{path} is in use by another server", errno=errno.EADDRINUSE)


def _refuse_port_in_use(bind: str | None, port: int) -> None:
    """One line for a port another server listens on, before nbdkit says it in two (it still
    does if one takes the port in between)."""
    try:
        found = socketlib.getaddrinfo(
            bind or "localhost", port, type=socketlib.SOCK_STREAM, flags=socketlib.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return  # nbdkit reports an address it cannot use
    for family, kind, proto, _, address in found:
        with socketlib.socket(family, kind, proto) as probe:
            probe.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)  # as nbdkit does
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise NbdError(
                        f"port {port} on {address[0]} is in use by another server",
                        errno=errno.EADDRINUSE,
                    ) from None


def _wait_ready(process: subprocess.Popen[bytes], pidfile: str, *, foreground: bool) -> bool:
    """True once nbdkit has written its pidfile; False if it exited first (or never got ready,
    in which case it is stopped)."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if _pidfile_written(pidfile):
            return True
        code = process.poll()
        if code is not None and (foreground or code != 0):
            return False
        # In the background the first nbdkit exits 0 after forking; its child writes the pidfile.
        time.sleep(READY_POLL_SECONDS)
    print(f"dedupblk: nbdkit not ready after {READY_TIMEOUT_SECONDS:.0f} s", file=sys.stderr)
    process.terminate()
    return False


def _pidfile_written(pidfile: str) -> bool:
    try:
        with open(pidfile) as handle:
            return handle.read().strip().isdigit()
    except FileNotFoundError:
        return False


def _exit_code(code: int) -> int:
    # nbdkit stopped by a signal it did not handle: report it as a shell would.
    return 128 - code if code < 0 else code


class _ControlPipe:
    """The write end of the plugin's control pipe (``control-fd=``): closing it, or the death
    of `serve`, is the plugin's signal to close the store and end nbdkit."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _forward_signals(process: subprocess.Popen[bytes], control: _ControlPipe) -> Iterator[None]:
    """While nbdkit runs in the foreground, SIGTERM/SIGINT/SIGHUP to `serve` close the plugin's
    control pipe and become SIGTERM to nbdkit: it stops accepting, and the plugin closes the
    store and ends nbdkit even if idle clients hold it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        control.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
