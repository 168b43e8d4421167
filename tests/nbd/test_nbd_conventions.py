"""nbdkit's conventions with real nbdkit 1.32: `--dump-plugin` without a store, from anywhere;
what `--help` and a bare store path do (nbdkit's Python plugin limits, pinned here so that the
docs change when they do); the export's description; and `dedupblk serve --run`, nbdkit's
captive mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dedupblk.nbd.params import PARSERS
from dedupblk.store import create_store

from .nbd_helpers import PLUGIN, ServerFactory, assert_clean, run

pytestmark = pytest.mark.nbd


def nbdkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """nbdkit as a user runs it: no PYTHONPATH (the plugin finds the checkout itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        ["nbdkit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
        check=False,
    )  # fmt: skip


def test_dump_plugin_lists_the_parameters_without_a_store_from_any_directory(
    tmp_path: Path,
) -> None:
    relative = os.path.relpath(PLUGIN, tmp_path)
    for args in (["python", relative], ["python", relative, "thread-model=parallel"]):
        done = nbdkit(*args, "--dump-plugin", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        lines = done.stdout.splitlines()
        assert lines[0].startswith("path=") and "name=python" in lines
        model = "parallel" if "thread-model=parallel" in args else "serialize_all_requests"
        assert f"thread_model={model}" in lines
        # ours come last, after nbdkit's own (its C stdio flushed first though stdout is a pipe)
        ours = lines[lines.index("dedupblk_version=0.1.0") :]
        assert len(ours) == 1 + len(PARSERS)
        keys = [line.split("=", 1)[0].removeprefix("dedupblk_parameter_") for line in ours[1:]]
        assert keys == list(PARSERS)
        assert all(line.split("=", 1)[1] for line in ours)


def test_help_and_a_bare_store_are_limits_of_nbdkits_python_plugin(tmp_path: Path) -> None:
    """nbdkit 1.32 answers --help before it loads the script, and its Python plugin has no
    magic config key: the plugin's docstring and the README say so. If this fails, nbdkit
    learnt one of them: use it, and fix those words."""
    done = nbdkit("python", str(PLUGIN), "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "script=<FILENAME>     (required) The Python plugin to run." in done.stdout
    assert "[other arguments may be used by the plugin that you load]" in done.stdout
    assert "store=" not in done.stdout
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    done = nbdkit("python", str(PLUGIN), str(store), "--dump-plugin", cwd=tmp_path)
    assert done.returncode == 1
    assert f"expecting key=value on the command line but got: {store}" in done.stderr


def test_the_export_description(nbd_server: ServerFactory) -> None:
    server = nbd_server(4 << 20)
    export = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert export["description"] == f"dedupblk store {server.store} (4 MiB, format 2)"


# ---- dedupblk serve --run -------------------------------------------------------------------


def serve_run(store: Path, command: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dedupblk.cli", "serve", str(store), *options, "--run", command],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_run_gives_the_command_uri_and_its_output(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 4 << 20)
    sock = tmp_path / "s.sock"
    done = serve_run(store, 'nbdinfo "$uri"; echo "nbd=$nbd unixsocket=$unixsocket"',
                     "--socket", str(sock))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("protocol: ")  # the command's stdout alone: no URI line before it
    assert f"\tdescription: dedupblk store {store} (4 MiB, format 2)" in lines
    assert f"nbd=nbd+unix://?socket={sock} unixsocket={sock}" in lines
    assert not sock.exists()  # the server's socket and pid file went with it
    assert_clean(store)


@pytest.mark.parametrize(("command", "code"), [("exit 3", 3), ("true", 0), ("kill -9 $$", 137)])
def test_run_exits_with_the_commands_status(tmp_path: Path, command: str, code: int) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    done = serve_run(store, command)
    assert done.returncode == code, done.stderr
    assert done.stdout == ""
    assert_clean(store)


def test_run_gives_the_command_serves_stdin_and_process_group(tmp_path: Path) -> None:
    """As under nbdkit alone: an interactive command has the terminal (its input, and the
    foreground process group a ^C goes to)."""
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    done = subprocess.run(
        [sys.executable, "-m", "dedupblk.cli", "serve", str(store), "--run",
         'read line; echo "got $line"; ps -o pgid= -p $$'],
        input="hello\n", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got, pgid = done.stdout.splitlines()
    assert got == "got hello"
    assert int(pgid) == os.getpgid(0)


def test_run_writes_data_that_is_there_afterwards(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 4 << 20)
    write = 'qemu-io -f raw -t writeback "$uri" -c "write -P 0x5a 0 1M" -c "write -P 0x5a 2M 1M"'
    done = serve_run(store, write)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_clean(store)
    check = subprocess.run([sys.executable, "-m", "dedupblk.cli", "check", str(store)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0 and check.stdout.startswith("clean"), check
    read = 'qemu-io -r -f raw "$uri" -c "read -P 0x5a 0 1M" -c "read -P 0x5a 2M 1M"'
    read += ' -c "read -P 0 1M 1M"'
    done = serve_run(store, read, "--readonly")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pattern verification failed" not in done.stdout


def test_run_with_a_store_that_cannot_be_served_fails_in_one_line(tmp_path: Path) -> None:
    done = serve_run(tmp_path / "missing", "echo never")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no such store" in done.stderr, done.stderr
    done = serve_run(tmp_path / "missing", "  ")
    assert (done.returncode, done.stderr) == (2, "dedupblk: --run needs a command\n")
