"""NBD benchmark: the same fio jobs against dedupblk's plugin and reference nbdkit servers.

    .venv/bin/python bench/nbd_bench.py [--rounds 3] [--runtime 10] [--size 256M]
        [--jobs rand-write-dup50,rand-read,seq-write,dedup-90]
        [--servers dedupblk,memory,minimal-python,sqlite-dedup,dedupblk-parallel:1,...]
        [--sqlite-plugin PATH/nbdsqlitededupe.py] [--baseline CHECKOUT] [--json results.json]

Servers (each started fresh, on a new store or RAM disk, for every job of every round):
  dedupblk            dedupblk/frontends/nbdkit_plugin.py on a new store (default thread model,
                      SERIALIZE_ALL_REQUESTS)
  dedupblk-ram        the same with the store in /dev/shm: a volatile store, which never syncs
                      (the difference to `dedupblk` is what durability costs)
  dedupblk-parallel   the same with thread-model=parallel (to choose the thread model)
  baseline, baseline-ram
                      `dedupblk` and `dedupblk-ram` served by the plugin of another checkout
                      (--baseline CHECKOUT, e.g. a worktree of an earlier commit with its own
                      .venv): before and after a change, alternated in one run
  memory              nbdkit's C memory plugin: the ceiling nbdkit itself allows
  minimal-python      bench/minimal_plugin.py, a PARALLEL Python plugin that only copies bytes:
                      the floor any Python plugin pays
  sqlite-dedup        an existing Python dedup plugin on SQLite (github 8086net/nbdsqlitededupe,
                      MIT; not part of this repository: pass its file with --sqlite-plugin or
                      DEDUP_SQLITE_PLUGIN, or it is left out)
  NAME:N              any of these with nbdkit --threads N (worker threads per connection;
                      nbdkit's default is 16)

Jobs are files in fio-jobs/ (their prefill phases are not reported). Servers run in alternation
(A B C A B C ...) so drift on a shared machine spreads over all of them; the table shows the
median of the rounds and the ratio of dedupblk to the memory plugin and to the minimal Python
plugin. fio's nbd engine is the client: one connection, client and server on the same 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fio_report import measure, timed_jobs  # bench/ is sys.path[0] for a script here

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "dedupblk" / "frontends" / "nbdkit_plugin.py"
MINIMAL = REPO / "bench" / "minimal_plugin.py"
JOBS_DIR = REPO / "fio-jobs"
DEFAULT_JOBS = ("rand-write-dup50", "rand-read", "seq-write", "dedup-90")
DEFAULT_SERVERS = ("dedupblk", "memory", "minimal-python", "sqlite-dedup")

ServerArgs = Callable[[Path, str], list[str]]


def _sqlite_plugin() -> str | None:
    return os.environ.get("DEDUP_SQLITE_PLUGIN")


def _baseline_plugin() -> str:
    return os.path.join(os.environ["DEDUP_BASELINE"], "dedupblk", "frontends", "nbdkit_plugin.py")


def _ram_store(tmp: Path) -> str:
    # A store in /dev/shm, removed with the server's work directory (see Server.stop).
    return f"/dev/shm/{tmp.name}-store"


SERVERS: dict[str, ServerArgs] = {
    "dedupblk": lambda tmp, size: ["python", str(PLUGIN), f"store={tmp}/store", f"size={size}"],
    "dedupblk-ram": lambda tmp, size: [
        "python",
        str(PLUGIN),
        f"store={_ram_store(tmp)}",
        f"size={size}",
    ],
    "baseline": lambda tmp, size: [
        "python",
        _baseline_plugin(),
        f"store={tmp}/store",
        f"size={size}",
    ],
    "baseline-ram": lambda tmp, size: [
        "python",
        _baseline_plugin(),
        f"store={_ram_store(tmp)}",
        f"size={size}",
    ],
    "dedupblk-parallel": lambda tmp, size: [
        "python",
        str(PLUGIN),
        f"store={tmp}/store",
        f"size={size}",
        "thread-model=parallel",
    ],
    "memory": lambda tmp, size: ["memory", f"size={size}"],
    "minimal-python": lambda tmp, size: ["python", str(MINIMAL), f"size={size}"],
    "sqlite-dedup": lambda tmp, size: [
        "python",
        str(_sqlite_plugin()),
        f"db={tmp}/dedup.sqlite3",
        f"size={size}",
    ],
}


@dataclass
class Result:
    job: str
    server: str
    round: int
    iops: float
    mib_s: float
    p99_us: float


def server_spec(spec: str) -> tuple[str, list[str]]:
    """`NAME` or `NAME:THREADS` (nbdkit --threads, worker threads per connection; default 16)."""
    name, _, threads = spec.partition(":")
    return name, ["--threads", threads] if threads else []


class Server:
    def __init__(self, spec: str, workdir: Path, size: str) -> None:
        name, options = server_spec(spec)
        self.socket = workdir / "nbd.sock"
        self.pidfile = workdir / "nbd.pid"
        self.log = open(workdir / "nbdkit.log", "wb")  # noqa: SIM115  (closed in stop)
        command = [
            "nbdkit", "--foreground", "--exit-with-parent",
            "--unix", str(self.socket), "--pidfile", str(self.pidfile), *options,
            *SERVERS[name](workdir, size),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (workdir / "nbdkit.log").read_text()
                raise RuntimeError(f"{name}: nbdkit did not start:\n{log}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(_ram_store(self.socket.parent), ignore_errors=True)


def run_fio(uri: str, job: str, size: str, runtime: int) -> list[dict[str, object]]:
    env = dict(os.environ, SIZE=size, RUNTIME=str(runtime))
    command = ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json"]
    command.append(str(JOBS_DIR / f"{job}.fio"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fio {job} failed ({result.returncode}):\n{result.stderr}")
    return timed_jobs(result.stdout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per timed job")
    parser.add_argument("--size", default="256M", help="export size and fio SIZE")
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS))
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS))
    parser.add_argument("--sqlite-plugin", help="path of nbdsqlitededupe.py (not vendored)")
    parser.add_argument("--baseline", help="a checkout whose plugin serves baseline[-ram]")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    if args.baseline:
        os.environ["DEDUP_BASELINE"] = os.path.abspath(args.baseline)
    if args.sqlite_plugin:
        os.environ["DEDUP_SQLITE_PLUGIN"] = os.path.abspath(args.sqlite_plugin)
    servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in servers if server_spec(s)[0] not in SERVERS]
    if unknown:
        parser.error(f"unknown server {unknown[0]} (known: {', '.join(SERVERS)})")
    if "sqlite-dedup" in servers and not _sqlite_plugin():
        print("sqlite-dedup: no --sqlite-plugin given, left out", file=sys.stderr)
        servers.remove("sqlite-dedup")
    if any(server_spec(s)[0].startswith("baseline") for s in servers) and not args.baseline:
        parser.error("baseline servers need --baseline CHECKOUT")
    jobs = [j for j in args.jobs.split(",") if j]
    results: list[Result] = []
    for round_ in range(args.rounds):
        for job in jobs:
            for server_name in servers:
                with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir="/var/tmp") as tmp:
                    server = Server(server_name, Path(tmp), args.size)
                    try:
                        for report in run_fio(server.uri, job, args.size, args.runtime):
                            iops, mib, p99 = measure(report)
                            name = str(report["jobname"])
                            results.append(Result(name, server_name, round_, iops, mib, p99))
                            print(
                                f"round {round_ + 1} {name:<18} {server_name:<20} "
                                f"{iops:9.0f} IOPS {mib:8.1f} MiB/s p99 {p99:9.0f} us",
                                file=sys.stderr,
                                flush=True,
                            )
                    finally:
                        server.stop()
    print_table(results, servers)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def print_table(results: list[Result], servers: list[str]) -> None:
    """One row per job and server (medians over rounds). dedupblk rows also show their ratio to
    the memory and minimal Python plugins, run with the same --threads when those were run."""

    def median(job: str, server: str, field: str) -> float | None:
        values = [getattr(r, field) for r in results if r.job == job and r.server == server]
        return statistics.median(values) if values else None

    def reference(job: str, name: str, threads: str) -> float | None:
        same = median(job, f"{name}:{threads}", "iops") if threads else None
        return same if same is not None else median(job, name, "iops")

    jobs = list(dict.fromkeys(r.job for r in results))
    print("| job | server | IOPS | MiB/s | p99 us | dedupblk/memory | dedupblk/minimal-python |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for job in jobs:
        for server in servers:
            iops = median(job, server, "iops")
            if iops is None:
                continue
            ratios = ["", ""]
            name, _, threads = server.partition(":")
            if name.startswith(("dedupblk", "baseline")) and iops:
                for column, other in enumerate(("memory", "minimal-python")):
                    base = reference(job, other, threads)
                    ratios[column] = f"{iops / base:.2f}x" if base else ""
            print(
                f"| {job} | {server} | {iops:.0f} | {median(job, server, 'mib_s'):.1f} | "
                f"{median(job, server, 'p99_us'):.0f} | {ratios[0]} | {ratios[1]} |"
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
