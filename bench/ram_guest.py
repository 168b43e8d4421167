"""Guest side of bench/ram_bench.py: the RAM that K containers' swap costs, zram vs dedupblk.

Runs inside the VM with the project's venv python (bench/ram_bench.py boots the guest)::

    python bench/ram_guest.py --containers 3,1 [--rounds 1] [--expect 3=DIGEST,1=DIGEST]

For every round and every K, the same workload (bench/ram_workload.py) swaps to two devices in
turn, alternating which goes first from round to round:

- ``zram``: /dev/zram0, 1 GiB, lz4, ``mkswap`` + ``swapon``.  Its RAM: ``mem_used_max`` (the
  fifth field of /sys/block/zram0/mm_stat).
- ``dedupblk``: a 1 GiB store whose directory is preallocated on ramfs (/run/dedupblk) and whose
  slots are a second zram device (hot-added, 1 GiB, lz4), served with ``dedupblk serve --frontend
  ublk --swap`` (swap discards on, or off with ``--discard off``).  Its RAM: that zram's
  ``mem_used_max``, the store directory on ramfs (``du -sk``) and the server's ``Anonymous:``
  (/proc/PID/smaps_rollup; its file-backed RSS is mostly the mapped data.mdb, already counted on
  ramfs).

The containers run in a cgroup v2 child with ``memory.max`` 160 MiB, which pushes most of them to
swap; this process stays outside it.  With ``--start together`` (the default) they all start at
once; with ``one-by-one`` each starts once the previous holds.  Once all of them hold, and
swap-outs have stopped, the figures are read; then the containers exit and the device is reset.
Every measurement is printed as one ``RESULT {json}`` line for the host to collect; progress goes
to stderr.

``container SEGMENTS FILL`` (run by this script as a child): one container.  It joins the cgroup
named by RAM_BENCH_CGROUP, fills a private anonymous mapping with the segments listed in the file
SEGMENTS (each file's page cache dropped once copied: the mapping is the workload), prints
``holding`` and sleeps until its stdin closes.  FILL ``direct`` reads each file straight into the
mapping, so every page is written once and almost nothing is swapped in; ``buffered`` reads each
file into a buffer first, then copies it (what ``m[a:b] = f.read(n)`` does): those buffers, up to
half a container, push pages of the mapping out and back in, so the same pages are swapped out
more than once (churn), and a store that keeps what it freed shows it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ram_workload  # bench/ is sys.path[0] for a script here

PAGE = ram_workload.PAGE
WORK = Path("/tmp")  # the guest's own tmpfs (cwd is the read-only repository)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP = CGROUP_ROOT / "ram-bench"
MEMORY_MAX = 160 << 20
ZRAM_BYTES = 1 << 30
STORE_SIZE = "1G"
RAMFS = Path("/run/dedupblk")
STORE = RAMFS / "swap"
ZRAM0 = Path("/sys/block/zram0")
RESULT_PREFIX = "RESULT "
HOLDING = "holding"
CGROUP_ENV = "RAM_BENCH_CGROUP"
# Swap-outs must stand still this long before the figures are read (the containers already hold
# their pages, so this only waits for reclaim still in flight).
SETTLE_SECONDS = 3.0
DEVICES = ("zram", "dedupblk")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=WORK, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def vmstat() -> dict[str, int]:
    pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {name: int(value) for name, value in pairs}


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    sys.exit(f"no {field} in /proc/meminfo")


def mm_stat(zram: Path) -> dict[str, int]:
    """/sys/block/zramN/mm_stat by name (bytes, except the page counts)."""
    names = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit", "mem_used_max",
             "same_pages", "pages_compacted", "huge_pages")  # fmt: skip
    values = (zram / "mm_stat").read_text().split()
    return dict(zip(names, map(int, values), strict=False))


def zram_setup(zram: Path) -> str:
    """Reset ``zram`` to an empty 1 GiB lz4 device; its /dev path."""
    (zram / "reset").write_text("1\n")
    (zram / "comp_algorithm").write_text("lz4\n")
    (zram / "disksize").write_text(f"{ZRAM_BYTES}\n")
    return f"/dev/{zram.name}"


def hot_add_zram() -> Path:
    number = Path("/sys/class/zram-control/hot_add").read_text().strip()
    return Path(f"/sys/block/zram{number}")


def cgroup_setup() -> None:
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        run("mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT))
    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory\n")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.max").write_text(f"{MEMORY_MAX}\n")


def cgroup_value(name: str) -> int:
    return int((CGROUP / name).read_text().split()[0])


class Server:
    """``dedupblk serve STORE --frontend ublk --swap`` in the background."""

    def __init__(self, discard: bool) -> None:
        self.log = WORK / "server.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dedupblk.cli", "serve", str(STORE), "--frontend", "ublk",
                 "--swap", "--swap-discard" if discard else "--no-swap-discard"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=WORK,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()  # printed once swap is on
        if not self.path:
            self.proc.wait()
            sys.exit(f"server exited {self.proc.returncode}: {self.log.read_text()}")

    def anonymous_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
        sys.exit("no Anonymous: in the server's smaps_rollup")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait()
        if code != 0:
            sys.exit(f"server exit {code}: {self.log.read_text()}")


class Containers:
    """The K container processes of one run, each holding its filled mapping.

    ``together``: all start at once and fill at the same time (as containers started together
    would); else one after another, each holding before the next starts."""

    def __init__(self, segment_files: list[Path], *, together: bool, fill: str) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        started = time.monotonic()
        for segments in segment_files:
            proc = subprocess.Popen(
                [sys.executable, __file__, "container", str(segments), fill],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=WORK,
                env={**os.environ, CGROUP_ENV: str(CGROUP)},
            )  # fmt: skip
            self.procs.append(proc)
            if not together:
                self._wait_holding(len(self.procs) - 1, started)
                started = time.monotonic()
        if together:
            for index in range(len(self.procs)):
                self._wait_holding(index, started)

    def _wait_holding(self, index: int, started: float) -> None:
        proc = self.procs[index]
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # a hang here is bounded by the VM's timeout
        if line != HOLDING:
            self.stop(check=False)
            events = (CGROUP / "memory.events").read_text().replace("\n", ", ")
            sys.exit(f"container {index} said {line!r}, exit {proc.poll()}; cgroup: {events}")
        member = Path(f"/proc/{proc.pid}/cgroup").read_text().strip()
        if member != f"0::/{CGROUP.name}":
            self.stop(check=False)
            sys.exit(f"container {index} is in cgroup {member!r}, not {CGROUP.name}")
        log(f"  container {index} holding after {time.monotonic() - started:.0f} s")

    def stop(self, *, check: bool = True) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            code = proc.wait()
            if check and code != 0:
                sys.exit(f"container pid {proc.pid} exited {code}")


def wait_for_swap_to_settle() -> None:
    last, still_since = vmstat()["pswpout"], time.monotonic()
    while time.monotonic() - still_since < SETTLE_SECONDS:
        time.sleep(0.5)
        now = vmstat()["pswpout"]
        if now != last:
            last, still_since = now, time.monotonic()


def flushes_done(device: str) -> int:
    """Flush requests ``device`` has completed (field 16 of the block layer's stat)."""
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[15])


def du_bytes(path: Path) -> int:
    return int(run("du", "-sk", str(path)).split()[0]) * 1024


def stale_pages(zram: Path, stored: int) -> int:
    """Pages the backend zram holds that no page of the store names (the header slot aside):
    slots freed but not (yet) given back, whose data still takes zram's memory."""
    stat = mm_stat(zram)
    held = stat["orig_data_size"] // ram_workload.PAGE + stat["same_pages"]
    return held - stored - 1


def wait_for_zram_to_settle(zram: Path) -> None:
    """Until zram's data stops changing (swap's discards are sent from a worker)."""
    last, still_since = mm_stat(zram)["orig_data_size"], time.monotonic()
    while time.monotonic() - still_since < SETTLE_SECONDS:
        time.sleep(0.5)
        now = mm_stat(zram)["orig_data_size"]
        if now != last:
            last, still_since = now, time.monotonic()


def one_run(device: str, containers: int, segment_files: list[Path], round_: int,
            backend_zram: Path, args: argparse.Namespace) -> None:  # fmt: skip
    started = time.monotonic()
    log(f"round {round_ + 1} K={containers} {device}")
    server = None
    if device == "zram":
        swap_dev = zram_setup(ZRAM0)
        run("mkswap", swap_dev)
        run("swapon", swap_dev)
        zram = ZRAM0
    else:
        zram = backend_zram
        backend = zram_setup(zram)
        if STORE.exists():
            shutil.rmtree(STORE)
        run(sys.executable, "-m", "dedupblk.cli", "create", str(STORE), "--size", STORE_SIZE,
            "--backend", backend, "--reuse-backend", "--preallocate")  # fmt: skip
        server = Server(args.discard == "on")
        swap_dev = server.path
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    if [line.split()[0] for line in swaps] != [swap_dev]:
        sys.exit(f"swap devices {swaps}, expected {swap_dev} alone")
    before, fill_started = vmstat(), time.monotonic()
    work = Containers(segment_files, together=args.start == "together", fill=args.fill)
    filled = time.monotonic()
    wait_for_swap_to_settle()
    after = vmstat()
    zram_bytes = mm_stat(zram)["mem_used_max"]
    record: dict[str, object] = {
        "containers": containers,
        "device": device,
        "round": round_,
        "start": args.start,
        "fill": args.fill,
        "pswpout": after["pswpout"] - before["pswpout"],
        "pswpin": after["pswpin"] - before["pswpin"],
        "swpout_zero": after.get("swpout_zero", 0) - before.get("swpout_zero", 0),
        "thp_swpout": after.get("thp_swpout", 0) - before.get("thp_swpout", 0),
        "swap_used": meminfo("SwapTotal") - meminfo("SwapFree"),
        "cgroup_memory": cgroup_value("memory.current"),
        "cgroup_swap": cgroup_value("memory.swap.current"),
        "zram": mm_stat(zram),
        "zram_bytes": zram_bytes,
        "device_flushes": flushes_done(swap_dev),
        "fill_seconds": filled - fill_started,
    }
    total = zram_bytes
    if server is not None:
        meta, anonymous = du_bytes(STORE), server.anonymous_bytes()
        record["meta_bytes"], record["server_anon_bytes"] = meta, anonymous
        record["store"] = json.loads(
            run(sys.executable, "-m", "dedupblk.cli", "stats", str(STORE), "--json")
        )
        stored = int(record["store"]["stored_pages"])  # type: ignore[index]
        record["stale_pages"] = stale_pages(zram, stored)
        total += meta + anonymous
    record["total_bytes"] = total
    work.stop()
    if server is not None:  # what the store still holds once the workload is gone
        wait_for_zram_to_settle(zram)
        after = json.loads(run(sys.executable, "-m", "dedupblk.cli", "stats", str(STORE), "--json"))
        record["exit_stored_pages"] = after["stored_pages"]
        record["exit_zram_bytes"] = mm_stat(zram)["orig_data_size"]
        record["exit_stale_pages"] = stale_pages(zram, after["stored_pages"])
    if server is not None:
        server.stop()
        shutil.rmtree(STORE)
    else:
        run("swapoff", swap_dev)
    (zram / "reset").write_text("1\n")
    seconds = time.monotonic() - started
    record["seconds"] = seconds
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    log(f"  swapped {record['pswpout']} pages, total {total >> 20} MiB ({seconds:.0f} s)")


def container(segments_file: Path, fill: str) -> None:
    """One container: join the cgroup, fill the mapping, hold it until stdin closes."""
    Path(os.environ[CGROUP_ENV], "cgroup.procs").write_text(f"{os.getpid()}\n")
    segments = ram_workload.load(segments_file)
    size = sum(s.span for s in segments)
    # Private: Python's default for mmap(-1, n) is MAP_SHARED, i.e. shmem, which is not the
    # anonymous memory of a container's processes (memory.stat counts it as file); filled
    # straight from 9p, the cgroup then runs out of memory with next to nothing swapped.
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(memory)
    offset = 0
    for segment in segments:
        with open(segment.path, "rb", buffering=0) as file:
            if fill == "buffered":
                data = file.read(segment.length)
                view[offset : offset + len(data)] = data
                done = len(data)
                del data
            else:
                done = 0
            while done < segment.length:
                got = file.readinto(view[offset + done : offset + segment.length])
                if not got:
                    sys.exit(f"{segment.path}: short read at {done} of {segment.length}")
                done += got
            # The file's page cache is charged to the cgroup too: drop it, the mapping is the
            # workload.
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        offset += segment.span
    print(HOLDING, flush=True)
    sys.stdin.read()  # until the parent closes it
    view.release()
    memory.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "container":
        container(Path(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", default="3,1", help="K values, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--start", choices=("together", "one-by-one"), default="together",
        help="containers fill at the same time, or each after the previous holds",
    )  # fmt: skip
    parser.add_argument(
        "--fill", choices=("direct", "buffered"), default="direct",
        help="read each file straight into the mapping, or into a buffer first, then copy",
    )  # fmt: skip
    parser.add_argument("--expect", default="", help="K=DIGEST,...: the host's layout digests")
    parser.add_argument("--discard", choices=("on", "off"), default="on")
    args = parser.parse_args()
    ks = [int(k) for k in args.containers.split(",") if k]
    expected = dict(item.split("=") for item in args.expect.split(",") if item)
    log(f"guest kernel {os.uname().release}, {os.cpu_count()} CPUs, "
        f"{meminfo('MemTotal') >> 20} MiB; THP "
        f"{Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()}")  # fmt: skip
    if Path("/sys/module/zswap/parameters/enabled").read_text().strip() != "N":
        sys.exit("zswap is enabled: it would take the swapped pages before the device")
    started = time.monotonic()
    files = ram_workload.select_files()
    layouts: dict[int, list[Path]] = {}
    for k in ks:
        containers = ram_workload.layout(files, k)
        found = ram_workload.digest(containers)
        if str(k) in expected and expected[str(k)] != found:
            sys.exit(f"K={k}: the guest's layout {found} is not the host's {expected[str(k)]}")
        layouts[k] = []
        for index, segments in enumerate(containers):
            path = WORK / f"segments-{k}-{index}.json"
            ram_workload.save(segments, path)
            layouts[k].append(path)
    log(f"{len(files)} files selected in {time.monotonic() - started:.0f} s")
    cgroup_setup()
    RAMFS.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "ramfs", "-o", "mode=700", "ramfs", str(RAMFS))
    backend_zram = hot_add_zram()
    for round_ in range(args.rounds):
        order = DEVICES if round_ % 2 == 0 else DEVICES[::-1]
        for k in ks:
            for device in order:
                one_run(device, k, layouts[k], round_, backend_zram, args)


if __name__ == "__main__":
    main()
