"""Guest side of bench/ublk_bench.py: fio against /dev/ublkbN (dedupblk) and /dev/zram0, in turn.

Runs inside the VM with the project's venv python (bench/ublk_bench.py boots the guest)::

    python bench/ublk_guest.py --rounds 2 --size 128M --runtime 10 \
        --jobs rand-write-dup50,rand-read,dedup-90 [--devices ublk,zram,...] [--profile DIR]

For every round, for every job: a fresh store of SIZE on the guest's ext4 /scratch served with
``dedupblk serve --frontend ublk``, then a fresh /dev/zram0 of the same size (reset, disksize),
each running the job file's own command line
(``SIZE=... RUNTIME=... fio --ioengine=io_uring --direct=1 --filename=DEV FILE``).  Devices
alternate (ublk, zram, ublk, zram...) so drift in the guest spreads over both.  ``ublk-zram`` is
dedupblk with its slots on a second zram device (``create --backend /dev/zramN``, the README's
"compressed too" placement) and its metadata on /scratch as before; ``ublk-ram`` the swap
placement (metadata preallocated on a ramfs, slots on the second zram: a volatile store, whose
commits do not sync) and ``store-ram`` the store alone placed so.  Two more show where the
time goes: ``ublk-minimal`` is bench/minimal_ublk.py, the same ublk frontend over a RAM disk (the
ceiling for a Python ublk server), and ``store`` is the store alone, driven from this process
with the job's writes (`store_alone`; no kernel, no frontend).  Every measurement is printed as
one ``RESULT {json}`` line for the host to collect.

With ``--profile DIR``, one more ublk run of the first job follows the measured rounds with
``DEDUPBLK_UBLK_PROFILE=DIR`` (cProfile of each queue thread, see dedupblk/ublk/queue.py); the
top functions are printed.  Its numbers are not part of the results (cProfile slows the server).
"""

from __future__ import annotations

import argparse
import configparser
import functools
import json
import math
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# fio's JSON through this checkout's dedupblk.fio_report (bench/ is sys.path[0] for a script
# here); not in --store-alone, which may run an older checkout's dedupblk.
if "--store-alone" not in sys.argv:
    from fio_report import measure, timed_jobs

# This checkout's dedupblk, or (BENCH_DEDUPBLK, for --baseline's store row) another checkout's.
sys.path.insert(1, os.environ.get("BENCH_DEDUPBLK") or str(Path(__file__).resolve().parent.parent))
from dedupblk.store import PAGE_SIZE, open_store

REPO = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO / "fio-jobs"
MINIMAL_SERVER = REPO / "bench" / "minimal_ublk.py"
SCRATCH = Path("/scratch")
ZRAM = Path("/sys/block/zram0")
WORK = Path("/tmp")  # the guest's tmpfs (the repository is read-only)
RESULT_PREFIX = "RESULT "
# ublk: dedupblk on /scratch (a durable store); ublk-ram: the swap placement (metadata on ramfs,
# preallocated, slots on a second zram: a volatile store); ublk-zram: metadata on /scratch, slots
# on zram; ublk-minimal: bench/minimal_ublk.py; store, store-ram: the store alone, in this process
# (`store_alone`), placed as ublk and ublk-ram are; zram: the kernel's zram.  In this order in
# bench/ublk_bench.py's table.
# With --baseline CHECKOUT, baseline and baseline-store are ublk and store served by that
# checkout's code (its .venv): before and after a change, alternated in one guest.
DEVICES = ("ublk", "baseline", "ublk-ram", "ublk-zram", "ublk-minimal", "store", "baseline-store",
           "store-ram", "zram")  # fmt: skip
RAMFS = Path("/run/dedupblk-bench")


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=WORK, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def cli(*args: str) -> str:
    return run([sys.executable, "-m", "dedupblk.cli", *args])


class UblkServer:
    """A fresh store on /scratch served over ublk (stopped and deleted by `stop`); with
    ``minimal``, bench/minimal_ublk.py's RAM disk instead of a store."""

    def __init__(
        self,
        size: str,
        env: dict[str, str] | None = None,
        backend: str | None = None,
        *,
        minimal: bool = False,
        in_ram: bool = False,
        checkout: Path | None = None,
    ) -> None:
        self.store = bench_store_path(in_ram=in_ram)
        python = str(checkout / ".venv" / "bin" / "python") if checkout else sys.executable
        if minimal:
            argv = [sys.executable, str(MINIMAL_SERVER), size]
        else:
            backend_args = ["--backend", backend, "--reuse-backend"] if backend else []
            if in_ram:
                backend_args.append("--preallocate")
            run([python, "-m", "dedupblk.cli", "create", str(self.store), "--size", size,
                 *backend_args])  # fmt: skip
            argv = [python, "-m", "dedupblk.cli", "serve", str(self.store), "--frontend", "ublk"]
        self.log = WORK / "server.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=WORK,
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
        if self.store.exists():
            shutil.rmtree(self.store)


def bench_store_path(*, in_ram: bool) -> Path:
    """Where a fresh bench store goes: /scratch, or a ramfs (mounted once) for the swap
    placement."""
    if in_ram and not os.path.ismount(RAMFS):
        RAMFS.mkdir(exist_ok=True)
        run(["mount", "-t", "ramfs", "-o", "mode=700", "ramfs", str(RAMFS)])
    path = (RAMFS if in_ram else SCRATCH) / "bench-store"
    if path.exists():
        shutil.rmtree(path)
    return path


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
    elif device in ("ublk-zram", "ublk-ram"):
        backend = backend_zram(parse_size(args.size))
        server = UblkServer(args.size, backend=backend, in_ram=device == "ublk-ram")
        dev = server.path
    elif device == "baseline":
        server = UblkServer(args.size, checkout=Path(args.baseline))
        dev = server.path
    elif device == "ublk-minimal":
        server = UblkServer(args.size, minimal=True)
        dev = server.path
    elif device in ("store", "store-ram"):
        store_alone(job, args, round_, in_ram=device == "store-ram")
        return
    elif device == "baseline-store":
        baseline_store_alone(job, args, round_)
        return
    else:
        dev = zram_reset(parse_size(args.size))
    try:
        reports = run_fio(dev, job, args.size, args.runtime)
    finally:
        if server is not None:
            server.stop()
            if device in ("ublk-zram", "ublk-ram"):
                (backend_zram_dir() / "reset").write_text("1\n")
        else:
            (ZRAM / "reset").write_text("1\n")
    for report in reports:
        iops, mib, p99 = measure(report)
        emit(str(report["jobname"]), device, round_, (iops, mib, p99), started)


def emit(
    job: str, device: str, round_: int, figures: tuple[float, float, float], started: float
) -> None:
    """One measurement (IOPS, MiB/s, p99 µs): a RESULT line for the host, a progress line."""
    iops, mib, p99 = figures
    record = {"job": job, "device": device, "round": round_, "iops": iops, "mib_s": mib,
              "p99_us": p99}  # fmt: skip
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    print(
        f"round {round_ + 1} {job:<18} {device:<12} {iops:8.0f} IOPS {mib:7.1f} MiB/s "
        f"p99 {p99:8.0f} us ({time.monotonic() - started:.0f} s with set-up)",
        file=sys.stderr, flush=True,
    )  # fmt: skip


def write_job(job: str) -> tuple[int, int] | None:
    """(duplicate percent, iodepth) of a job file whose one job is 4 KiB random writes, else
    None.  [global] options count; fio's own defaults fill the rest (iodepth 1, no duplicates)."""
    parser = configparser.ConfigParser(allow_no_value=True, interpolation=None)
    parser.read(JOBS_DIR / f"{job}.fio")
    sections = [name for name in parser.sections() if name != "global"]
    if len(sections) != 1:
        return None
    options = parser[sections[0]]  # falls back to [global]
    if options.get("rw") != "randwrite" or options.get("bs", "4k").lower() != "4k":
        return None
    return int(options.get("dedupe_percentage", "0")), int(options.get("iodepth", "1"))


def store_alone(job: str, args: argparse.Namespace, round_: int, *, in_ram: bool) -> None:
    """The store's share of a write job, without kernel or frontend: the job's 4 KiB random writes
    put to a fresh store from this process (on /scratch, or ``in_ram`` placed as ublk-ram is), in
    passes of the job's iodepth, committed as the ublk server commits (``in_ram``: once a pass;
    on /scratch by the store's committer, and once at the end, timed).  Like fio
    (randrepeat=0, its random map on) the offsets visit every page once, in random order, before
    any is written again; like fio's "repeat" dedupe mode a duplicate repeats the last unique
    page.  Only the store calls are timed (``runtime`` seconds of them), without the server's
    mlockall; "p99" is that of a whole pass.  Jobs that are not one 4 KiB random-write job are
    skipped."""
    shape = write_job(job)
    if shape is None:
        return
    duplicates, depth = shape
    started = time.monotonic()
    path = bench_store_path(in_ram=in_ram)
    if in_ram:
        backend = backend_zram(parse_size(args.size))
        cli("create", str(path), "--size", args.size, "--backend", backend, "--reuse-backend",
            "--preallocate")  # fmt: skip
    else:
        cli("create", str(path), "--size", args.size)
    rng = random.Random(round_)
    order: list[int] = []
    pages = parse_size(args.size) // PAGE_SIZE
    base = bytearray(rng.randbytes(PAGE_SIZE))
    buffers = [bytearray(PAGE_SIZE) for _ in range(depth)]
    views = [memoryview(b) for b in buffers]
    unique = 0
    passes: list[float] = []
    spent = 0.0
    # An older --baseline checkout takes group_commit=None as False and has no
    # commits_in_background: it commits every pass, as its server did.
    with open_store(str(path), group_commit=None) as store:
        each_pass = not getattr(store, "commits_in_background", False)
        while spent < args.runtime:
            offsets = []
            for buffer in buffers:
                if not order:
                    order = list(range(pages))
                    rng.shuffle(order)
                offsets.append(order.pop() * PAGE_SIZE)
                if unique == 0 or rng.randrange(100) >= duplicates:
                    unique += 1
                    base[:8] = unique.to_bytes(8, "little")
                buffer[:] = base
            begin = time.perf_counter()
            for offset, view in zip(offsets, views, strict=True):
                store.write(offset, view)
            if each_pass:
                store.commit()
            took = time.perf_counter() - begin
            passes.append(took)
            spent += took
        begin = time.perf_counter()
        store.commit()
        spent += time.perf_counter() - begin
    shutil.rmtree(path)
    if in_ram:
        (backend_zram_dir() / "reset").write_text("1\n")
    passes.sort()
    p99 = passes[math.ceil(len(passes) * 0.99) - 1] * 1e6
    iops = len(passes) * depth / spent
    device = "store-ram" if in_ram else "store"
    emit(job, device, round_, (iops, iops * PAGE_SIZE / (1 << 20), p99), started)


def baseline_store_alone(job: str, args: argparse.Namespace, round_: int) -> None:
    """`store_alone` with the --baseline checkout's store: this script again, in its venv, with
    its dedupblk first on sys.path; its one result is passed on as ``baseline-store``."""
    checkout = Path(args.baseline)
    out = run(
        [str(checkout / ".venv" / "bin" / "python"), __file__, "--store-alone", job,
         "--round", str(round_), "--size", args.size, "--runtime", str(args.runtime)],
        env={**os.environ, "BENCH_DEDUPBLK": str(checkout)},
    )  # fmt: skip
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line.removeprefix(RESULT_PREFIX))
            figures = (record["iops"], record["mib_s"], record["p99_us"])
            emit(job, "baseline-store", round_, figures, time.monotonic())


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
    parser.add_argument("--devices", default="ublk,zram", help=f"of {', '.join(DEVICES)}")
    parser.add_argument("--profile", help="directory for a profiled extra ublk run's dumps")
    parser.add_argument("--baseline", help="a checkout (with its .venv) for the baseline rows")
    parser.add_argument("--store-alone", metavar="JOB", help=argparse.SUPPRESS)  # baseline-store
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime <= 0:
        parser.error("--runtime must be at least 1 second")
    if args.store_alone:
        store_alone(args.store_alone, args, args.round, in_ram=False)
        return
    jobs = [j for j in args.jobs.split(",") if j]
    devices = [d for d in args.devices.split(",") if d]
    unknown = set(devices) - set(DEVICES)
    if unknown:
        parser.error(f"unknown devices {sorted(unknown)}")
    if any(d.startswith("baseline") for d in devices) and not args.baseline:
        parser.error("the baseline devices need --baseline CHECKOUT")
    print(f"guest kernel {os.uname().release}, {os.cpu_count()} CPUs", flush=True)
    for round_ in range(args.rounds):
        for job in jobs:
            for device in devices:
                one_run(device, job, args, round_)
    if args.profile:
        profile_run(jobs[0], args)


if __name__ == "__main__":
    main()
