"""The main job (``make demo``): serve a fresh store over NBD, run the swap-like fio job against it,
stop the server, check the store and print its stats (dedup ratio, bytes saved).

Everything goes through the real pieces a user runs: ``dedupblk create``, ``dedupblk serve
--frontend nbd --foreground`` (nbdkit and the plugin), fio's nbd engine with
``fio-jobs/swap-mix.fio``, then ``dedupblk check`` and ``dedupblk stats``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(os.environ.get("DEDUPBLK_DEMO_DIR", "/var/tmp/dedupblk-demo"))  # noqa: S108
SIZE = os.environ.get("DEDUPBLK_DEMO_SIZE", "256M")
RUNTIME = os.environ.get("DEDUPBLK_DEMO_RUNTIME", "10")


def _dedupblk(*args: str) -> list[str]:
    return [sys.executable, "-m", "dedupblk.cli", *args]


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    store = DEMO_DIR / "store"
    socket = DEMO_DIR / "nbd.sock"
    subprocess.run(_dedupblk("create", str(store), "--size", SIZE), check=True)
    server = subprocess.Popen(
        _dedupblk(
            "serve", str(store), "--frontend", "nbd", "--socket", str(socket), "--foreground"
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        uri = server.stdout.readline().strip()
        if not uri.startswith("nbd"):
            print("dedupblk: the NBD server did not start", file=sys.stderr)
            return 1
        print(f"serving {store} at {uri}; fio-jobs/swap-mix.fio, {SIZE}, {RUNTIME} s a phase")
        fio = subprocess.run(
            ["fio", "--ioengine=nbd", f"--uri={uri}", str(REPO / "fio-jobs" / "swap-mix.fio")],
            env=dict(os.environ, SIZE=SIZE, RUNTIME=RUNTIME),
            check=False,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    if fio.returncode != 0:
        return fio.returncode
    print("\nafter the server stopped:")
    check = subprocess.run(_dedupblk("check", str(store)), check=False)
    subprocess.run(_dedupblk("stats", str(store)), check=True)
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
