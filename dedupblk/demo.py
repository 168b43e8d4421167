"""The main job (``make demo``): serve a fresh store over NBD, run the swap-like fio job against it,
stop the server, check the store and end with a short table: per fio phase IOPS, MiB/s and p99
latency, then what the store holds (stored, saved, dedup ratio).

Everything goes through the real pieces a user runs: ``dedupblk create``, ``dedupblk serve
--frontend nbd --foreground`` (nbdkit and the plugin), fio's nbd engine with
``fio-jobs/swap-mix.fio``, then ``dedupblk check`` and ``dedupblk stats --json``. Its files are
under ``$DEDUPBLK_DEMO_DIR`` (default /var/tmp/dedupblk-demo, replaced at each run): the store,
fio's whole output ``fio.log`` (``--output-format=json,normal``: its JSON report, which the
table is made from, then its usual text), the server's stderr ``server.log``. The demo says
where they are and how much they take.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .fio_report import phase_table
from .sizes import format_size

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(os.environ.get("DEDUPBLK_DEMO_DIR", "/var/tmp/dedupblk-demo"))  # noqa: S108
SIZE = os.environ.get("DEDUPBLK_DEMO_SIZE", "256M")
RUNTIME = os.environ.get("DEDUPBLK_DEMO_RUNTIME", "10")


def _dedupblk(*args: str) -> list[str]:
    return [sys.executable, "-m", "dedupblk.cli", *args]


def usage_lines(stats: dict[str, Any]) -> list[str]:
    """What the store holds, from ``dedupblk stats --json`` (the words of its --help)."""
    ratio = stats["dedup_ratio"]
    return [
        f"{'logical':<14} {format_size(stats['logical_bytes']):>12}  "
        f"(pages that are not zeros, of a {format_size(stats['size_bytes'])} device)",
        f"{'stored':<14} {format_size(stats['stored_bytes']):>12}  "
        f"({stats['used_percent']:.1f}% of the backend's {format_size(stats['capacity_bytes'])})",
        f"{'saved':<14} {format_size(stats['saved_bytes']):>12}  "
        f"({stats['saving_percent']:.1f}% of logical)",
        f"{'dedup ratio':<14} {f'{ratio:.2f}' if ratio else '-':>12}  (logical over stored)",
    ]


def summary(fio_report: str, stats: dict[str, Any]) -> list[str]:
    """The demo's closing table: fio's phases, then the store's usage."""
    return [*phase_table(fio_report), "", *usage_lines(stats)]


def disk_usage(directory: Path) -> int:
    """Bytes the files under ``directory`` take on disk (sparse files count what they hold)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    store = DEMO_DIR / "store"
    socket = DEMO_DIR / "nbd.sock"
    fio_log, server_log = DEMO_DIR / "fio.log", DEMO_DIR / "server.log"
    print(f"dedupblk demo: its files go to {DEMO_DIR} (remove them with: rm -rf {DEMO_DIR})")
    subprocess.run(_dedupblk("create", str(store), "--size", SIZE), check=True)
    with server_log.open("w") as log:
        server = subprocess.Popen(
            _dedupblk(
                "serve", str(store), "--frontend", "nbd", "--socket", str(socket), "--foreground"
            ),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert server.stdout is not None
        uri = server.stdout.readline().strip()
        if not uri.startswith("nbd"):
            print(f"dedupblk: the NBD server did not start (see {server_log})", file=sys.stderr)
            return 1
        print(f"serving {store} at {uri}")
        print(
            f"running fio-jobs/swap-mix.fio: {SIZE}, {RUNTIME} s a phase "
            f"(fio's output goes to {fio_log})",
            flush=True,
        )
        with fio_log.open("w") as log:
            fio = subprocess.run(
                ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json,normal",
                 str(REPO / "fio-jobs" / "swap-mix.fio")],
                env=dict(os.environ, SIZE=SIZE, RUNTIME=RUNTIME),
                stdout=log, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    if fio.returncode != 0:
        print(f"dedupblk: fio exited {fio.returncode}: see {fio_log}", file=sys.stderr)
        return fio.returncode
    check = subprocess.run(
        _dedupblk("check", str(store)), capture_output=True, text=True, check=False
    )
    print(f"after the server stopped, dedupblk check: {check.stdout.strip() or check.stderr}")
    stats = json.loads(
        subprocess.run(
            _dedupblk("stats", str(store), "--json"), capture_output=True, text=True, check=True
        ).stdout
    )
    print()
    for line in summary(fio_log.read_text(), stats):
        print(line)
    print(
        f"\nthe demo's files take {format_size(disk_usage(DEMO_DIR))} in {DEMO_DIR}; "
        f"remove them with: rm -rf {DEMO_DIR}"
    )
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
