"""Real nbdkit servers for the NBD tier: one private socket and store per test.

Each server runs `nbdkit --foreground` with dedupblk's plugin exactly as a user would (no
PYTHONPATH: the plugin finds the checkout and its .venv itself), and is stopped with SIGTERM so the
plugin's cleanup runs and closes the store. Readiness is nbdkit's pidfile, which it writes once its
socket is listening.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk.store import PAGE_SIZE, Statistics, check_store, create_store, open_store

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "dedupblk" / "frontends" / "nbdkit_plugin.py"
START_TIMEOUT = 60.0  # a bound on waiting, never a measurement
STOP_TIMEOUT = 60.0


class NbdServer:
    """One nbdkit process serving `store`; restartable on the same socket."""

    def __init__(self, store: Path, workdir: Path, params: list[str], nbdkit_args: list[str]):
        self.store = store
        self.socket = workdir / "nbd.sock"
        self.pidfile = workdir / "nbd.pid"
        self.log = workdir / "nbdkit.log"
        self.params = params
        self.nbdkit_args = nbdkit_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def command(self) -> list[str]:
        return [
            "nbdkit", "--foreground", "--exit-with-parent",
            "--unix", str(self.socket), "--pidfile", str(self.pidfile),
            *self.nbdkit_args,
            "python", str(PLUGIN), f"store={self.store}", *self.params,
        ]  # fmt: skip

    def start(self) -> NbdServer:
        assert self.process is None, "already running"
        for leftover in (self.pidfile, self.socket):
            leftover.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                self.process = None
                raise AssertionError(f"nbdkit did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> int:
        """SIGTERM, as an operator would; returns nbdkit's exit status."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.kill()
        process.wait()

    def restart(self) -> NbdServer:
        assert self.stop() == 0, self.log.read_text()
        return self.start()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.kill()


class ServerFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[NbdServer] = []

    def __call__(
        self,
        size: int = 64 << 20,
        *,
        params: list[str] | None = None,
        nbdkit_args: list[str] | None = None,
        backend_size: int | None = None,
        name: str = "store",
        create: bool = True,
    ) -> NbdServer:
        store = self.tmp_path / name
        if create:
            create_store(store, size, backend_size=backend_size)
        workdir = self.tmp_path / f"{name}.run"
        workdir.mkdir()
        server = NbdServer(store, workdir, params or [], nbdkit_args or [])
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            if server.process is not None:
                server.kill()


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def run(*command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a client; fail the test with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{command[0]} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def statistics(store: Path) -> Statistics:
    with open_store(store, readonly=True) as opened:
        return opened.statistics()


def assert_clean(store: Path) -> None:
    result = check_store(store)
    assert not result.problems, result.problems


__all__ = [
    "PAGE_SIZE",
    "NbdServer",
    "ServerFactory",
    "assert_clean",
    "nbd_server",
    "run",
    "statistics",
]
