"""`dedupblk serve --frontend nbd`: run nbdkit with dedupblk's plugin on a store.

nbdkit embeds Debian's /usr/bin/python3, which sees neither this package nor the venv's
site-packages unless told: `serve` sets PYTHONPATH (the directory holding `dedupblk`, then this
interpreter's site-packages) and puts this interpreter's `bin/` first on PATH. It waits until
nbdkit has written its pidfile (nbdkit does that once its socket is listening), then prints the
NBD URI alone on one line of stdout.

Exposure: by default a Unix socket of mode 0600 in a per-user runtime directory of mode 0700;
TCP only when a port is given, bound to localhost unless `bind` says otherwise.

In the foreground `serve` forwards SIGTERM/SIGINT to nbdkit, which finishes its requests and runs
the plugin's cleanup (the store is flushed and marked clean), and returns nbdkit's exit code. In
the background nbdkit forks itself and `serve` returns 0 once the URI is printed; stop the server
with `kill $(cat PIDFILE)` (the pidfile path is printed on stderr).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket as socketlib
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

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
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base):
        base = tempfile.gettempdir()
        directory = Path(base) / f"dedupblk-{os.getuid()}"
    else:
        directory = Path(base) / "dedupblk"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not directory.is_dir():
        raise NbdError(f"{directory} is not a private directory owned by this user")
    return directory


def default_socket(store_path: str) -> Path:
    """`RUNTIME/<store name>-<hash of its absolute path>.sock`: stable per store, short enough
    for a Unix socket path."""
    absolute = os.path.abspath(store_path)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:12]
    name = (os.path.basename(absolute.rstrip("/")) or "store")[:32]
    return runtime_dir() / f"{name}-{digest}.sock"


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
    extra_args: Sequence[str] = (),
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
    if tls is not None:
        command.append(f"--tls={tls}")
    if tls_certificates is not None:
        command += ["--tls-certificates", os.path.abspath(tls_certificates)]
    command += list(extra_args)
    command += ["python", str(PLUGIN), f"store={os.path.abspath(store_path)}"]
    if readonly:
        command.append("readonly=true")
    return command


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
    extra_args: Sequence[str] = (),
) -> int:
    """Serve ``store_path`` over NBD with nbdkit; print the URI once it accepts connections.

    Returns the exit code for the CLI: nbdkit's own in the foreground (0 after a clean stop by
    SIGTERM/SIGINT), 0 once the background server is up, and nbdkit's nonzero code if it failed
    to start (its one-line error is already on stderr). Raises InvalidRequest for bad options and
    NbdError when nbdkit cannot be started.
    """
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
    if port is None:
        socket = os.path.abspath(socket) if socket is not None else str(default_socket(store_path))
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise InvalidRequest(f"socket path {socket} is longer than {UNIX_PATH_MAX} bytes")
        _remove_stale_socket(socket)
        pidfile = socket + ".pid"
    else:
        pidfile = str(runtime_dir() / f"nbd-{port}.pid")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    command = nbdkit_command(
        store_path,
        socket=socket,
        port=port,
        bind=bind,
        readonly=readonly,
        foreground=foreground,
        tls=tls,
        tls_certificates=tls_certificates,
        pidfile=pidfile,
        extra_args=extra_args,
    )
    uri = nbd_uri(socket=socket, port=port, bind=bind, tls=tls in ("on", "require"))
    try:
        process = subprocess.Popen(
            command,
            env=plugin_environment(),
            stdin=subprocess.DEVNULL,
            # Its own process group: a terminal's ^C reaches `serve`, which forwards it once.
            process_group=0,
        )
    except FileNotFoundError:
        raise NbdError(f"{NBDKIT} is not installed (apt-get install nbdkit)") from None
    with _forward_signals(process):
        if not _wait_ready(process, pidfile, foreground=foreground):
            code = process.wait()
            return code if code > 0 else 1
        if socket is not None:
            # nbdkit makes its socket 0755 whatever our umask. Until this chmod, others still
            # cannot connect: connect() needs write permission.
            os.chmod(socket, 0o600)
        print(uri, flush=True)
        if not foreground:
            print(f"dedupblk: nbdkit pid file {pidfile}", file=sys.stderr, flush=True)
            return 0
        code = _exit_code(process.wait())
    # nbdkit leaves its socket and pidfile behind; a foreground server's are gone with it.
    for leftover in (socket, pidfile):
        if leftover is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return code


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
        os.unlink(path)  # nobody listens: a killed server's leftover
        return
    finally:
        probe.close()
    raise NbdError(f"{path} is in use by another server", errno=errno.EADDRINUSE)


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


@contextlib.contextmanager
def _forward_signals(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """While nbdkit runs in the foreground, SIGTERM/SIGINT/SIGHUP to `serve` become SIGTERM to
    nbdkit, which then stops cleanly (runs the plugin's cleanup)."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
