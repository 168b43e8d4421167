"""Guest side of bench/ublk_bench.py: fio against /dev/ublkbN (dedupblk) and /dev/zram0, in turn.

Runs inside the VM with the project's venv python (bench/ublk_bench.py boots the guest)::

    python bench/ublk_guest.py --rounds 2 --size 128M --runtime 10 \
        --jobs rand-write-dup50,rand-read,dedup-90 [--devices ublk,zram,ublk-zram] [--profile DIR]

For every round, for every job: a fresh store of SIZE on the guest's ext4 /scratch served with
``dedupblk serve --frontend ublk``, then a fresh /dev/zram0 of the same size (reset, disksize),
each running the job file's own command line
(``SIZE=... RUNTIME=... fio --ioengine=io_uring --direct=1 --filename=DEV FILE``).  Devices
alternate (ublk, zram, ublk, zram...) so drift in the guest spreads over both.  ``ublk-zram`` is
dedupblk with its slots on a second zram device (``create --backend /dev/zramN``, the README's
"compressed too" placement) and its metadata on /scratch as before.  Every measurement
is printed as one ``RESULT {json}`` line for the host to collect.

With ``--profile DIR``, one more ublk run of the first job follows the measured rounds with
``DEDUPBLK_UBLK_PROFILE=DIR`` (cProfile of each queue thread, see dedupblk/frontends/ublk.py); the
top functions are printed.  Its numbers are not part of the results (cProfile slows the server).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fio_report import measure, timed_jobs  # bench/ is sys.path[0] for a script here

REPO = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO / "fio-jobs"
SCRATCH = Path("/scratch")
ZRAM = Path("/sys/block/zram0")
WORK = Path("/tmp")  # the guest's tmpfs (the repository is read-only)
RESULT_PREFIX = "RESULT "


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=WORK, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def cli(*args: str) -> str:
    return run([sys.executable, "-m", "dedupblk.cli", *args])


class UblkServer:
    """A fresh store on /scratch served over ublk (stopped and deleted by `stop`)."""

    def __init__(
        self, size: str, env: dict[str, str] | None = None, backend: str | None = None
    ) -> None:
        self.store = SCRATCH / "bench-store"
        if self.store.exists():
            shutil.rmtree(self.store)
        cli("create", str(self.store), "--size", size, *(["--backend", backend] if backend else []))
        self.log = WORK / "server.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dedupblk.cli", "serve", str(self.store),
                 "--frontend", "ublk"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=WORK,
                env=None if env is None else {**os.environ, **env},
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()
        if not self.path:
            self.proc.wait()
            sys.exit(f"server exited {self.proc.returncode}: {self.log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait()
        if code != 0:
            sys.exit(f"server exit {code}: {self.log.read_text()}")
        shutil.rmtree(self.store)


def zram_reset(size_bytes: int, zram: Path = ZRAM) -> str:
    (zram / "reset").write_text("1\n")
    (zram / "disksize").write_text(f"{size_bytes}\n")
    return f"/dev/{zram.name}"


@functools.cache
def backend_zram_dir() -> Path:
    """A second zram device (hot-added once), for dedupblk's slots."""
    number = Path("/sys/class/zram-control/hot_add").read_text().strip()
    return Path(f"/sys/block/zram{number}")


def backend_zram(size_bytes: int) -> str:
    """The slots' zram reset to the device's size plus a quarter (the headroom a file backend
    gets by default, for overwrites waiting on a commit) and the header slot."""
    return zram_reset(size_bytes + size_bytes // 4 + 4096, backend_zram_dir())


def parse_size(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if size[-1].upper() in units:
        return int(size[:-1]) * units[size[-1].upper()]
    return int(size)


def run_fio(dev: str, job: str, size: str, runtime: int) -> list[dict[str, object]]:
    env = dict(os.environ, SIZE=size, RUNTIME=str(runtime))
    out = run(
        ["fio", "--ioengine=io_uring", "--direct=1", f"--filename={dev}", "--output-format=json",
         str(JOBS_DIR / f"{job}.fio")],
        env=env,
    )  # fmt: skip
    return timed_jobs(out)


def one_run(device: str, job: str, args: argparse.Namespace, round_: int) -> None:
    started = time.monotonic()
    server = None
    if device == "ublk":
        server = UblkServer(args.size)
        dev = server.path
    elif device == "ublk-zram":
        server = UblkServer(args.size, backend=backend_zram(parse_size(args.size)))
        dev = server.path
    else:
        dev = zram_reset(parse_size(args.size))
    try:
        reports = run_fio(dev, job, args.size, args.runtime)
    finally:
        if server is not None:
            server.stop()
            if device == "ublk-zram":
                (backend_zram_dir() / "reset").write_text("1\n")
        else:
            (ZRAM / "reset").write_text("1\n")
    for report in reports:
        iops, mib, p99 = measure(report)
        record = {"job": report["jobname"], "device": device, "round": round_, "iops": iops,
                  "mib_s": mib, "p99_us": p99}  # fmt: skip
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        print(
            f"round {round_ + 1} {record['job']:<18} {device:<5} {iops:8.0f} IOPS "
            f"{mib:7.1f} MiB/s p99 {p99:8.0f} us ({time.monotonic() - started:.0f} s with set-up)",
            file=sys.stderr, flush=True,
        )  # fmt: skip


def profile_run(job: str, args: argparse.Namespace) -> None:
    directory = Path(args.profile)
    directory.mkdir(parents=True, exist_ok=True)
    server = UblkServer(args.size, env={"DEDUPBLK_UBLK_PROFILE": str(directory)})
    try:
        for report in run_fio(server.path, job, args.size, args.runtime):
            iops, _, p99 = measure(report)
            print(f"profiled {report['jobname']}: {iops:.0f} IOPS p99 {p99:.0f} us (cProfile on)")
    finally:
        server.stop()
    for dump in sorted(directory.glob("*.prof")):
        print(f"== {dump.name}: top by internal time")
        pstats.Stats(str(dump)).sort_stats("tottime").print_stats(22)
        print(f"== {dump.name}: top by cumulative time")
        pstats.Stats(str(dump)).sort_stats("cumulative").print_stats(22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--size", default="128M")
    parser.add_argument("--jobs", default="rand-write-dup50,rand-read,dedup-90")
    parser.add_argument("--devices", default="ublk,zram", help="of ublk, zram, ublk-zram")
    parser.add_argument("--profile", help="directory for a profiled extra ublk run's dumps")
    args = parser.parse_args()
    jobs = [j for j in args.jobs.split(",") if j]
    devices = [d for d in args.devices.split(",") if d]
    unknown = set(devices) - {"ublk", "zram", "ublk-zram"}
    if unknown:
        parser.error(f"unknown devices {sorted(unknown)}")
    print(f"guest kernel {os.uname().release}, {os.cpu_count()} CPUs", flush=True)
    for round_ in range(args.rounds):
        for job in jobs:
            for device in devices:
                one_run(device, job, args, round_)
    if args.profile:
        profile_run(jobs[0], args)


if __name__ == "__main__":
    main()
