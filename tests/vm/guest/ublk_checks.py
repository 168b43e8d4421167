"""Guest side of tests/vm/test_ublk.py: real ublk checks, one group per boot.

Runs inside the VM with the project's venv python (``python tests/vm/guest/ublk_checks.py GROUP``):

- ``block``: fio verify across a server restart, ext4 with fsck and checksums, blkdiscard, crash
  and ``--recover``, ``devices --cleanup``, ``serve --metrics`` scraped over HTTP and the
  server's counters in ``stats``.
- ``swap``: the tmpfs refusal, then real swap on the device with the whole guest out of memory,
  in the README's swap placement: the store's directory (its LMDB metadata) preallocated on a
  ramfs mounted at /run/dedupblk, its slots on a block device of their own (the harness's raw
  disk, /dev/vdb: boot with ``raw_disk_mb``).  A memory hog with no cgroup allocates 1.5 times
  the guest's MemAvailable in pages that are zero, same-filled, duplicated or unique, verifies
  every byte, and the store's statistics show the dedup.
- ``swap-cgroup``: the same with the hog confined to a memory cgroup (1.5 times its limit), so
  that only the hog is short of memory.
- ``swap-file-slots``: the whole-machine hog with the slots in a file created ``--preallocate``
  on /scratch remounted ``lazytime`` instead (metadata on ramfs as before): the placement before
  the block device, kept to compare (see "Swap placement" in docs/swap.md).
- ``swap-disk-meta``: the whole-machine hog with the whole store (metadata too) preallocated on
  /scratch remounted ``lazytime``: the placement before ramfs, kept to compare.
- ``swap-unsafe``: the whole-machine hog with a plain store (sparse files, holes punched) on
  /scratch mounted without ``lazytime``; kept to reproduce the deadlock that section describes.
- ``allocate BYTES [CGROUP]``: the memory hog itself (run as a child by the swap groups).

Run a swap group by hand with ``python -m testbed.vm run --memory-mb 768 --scratch-mb 1024
--raw-disk-mb 640 [--save-console FILE] -- '.venv/bin/python tests/vm/guest/ublk_checks.py
GROUP'``; while the hog runs, a ``swap-watch`` line in the kernel log (the console) every 20 s
shows swap progress and the server threads' states, with the kernel stack of any of them in
uninterruptible sleep.  Booted with ``--gdb SOCKET`` as well, a hung guest's vCPUs can be
sampled from the host with ``python -m testbed.vcpu_stacks SOCKET``.

Every check prints ``ok: NAME`` when it passed; the first failure prints ``FAIL: NAME: why`` and
exits 1, so the host test sees which one broke.  No check depends on timing.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dedupblk.ublk.control import Device, list_devices
from dedupblk.ublk.hardening import set_io_flusher

PAGE = 4096
REPO = Path(__file__).resolve().parents[3]
WORK = Path("/tmp")  # the guest's own tmpfs (cwd is the read-only repository)
BROKEN_TRIM = Path(__file__).resolve().parent / "broken_trim"  # its sitecustomize breaks trims
# PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE: what prctl(PR_SET_IO_FLUSHER, 1) sets on a thread.
IO_FLUSHER_FLAGS = 0x00080000 | 0x00100000
MCL_CURRENT, MCL_FUTURE = 1, 2
PR_SET_IO_FLUSHER = 57


class CheckFailed(Exception):
    pass


def require(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


@contextmanager
def check(name: str) -> Iterator[None]:
    print(f"-- {name}", flush=True)
    try:
        yield
    except CheckFailed as exc:
        print(f"FAIL: {name}: {exc}", flush=True)
        sys.exit(1)
    print(f"ok: {name}", flush=True)


def run(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=WORK, check=False)
    if ok and done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "dedupblk.cli", *args, ok=ok)


def stats(store: str) -> dict[str, float]:
    result: dict[str, float] = json.loads(cli("stats", store, "--json").stdout)
    return result


def devices() -> list[Device]:
    return list_devices()


class Server:
    """``dedupblk serve STORE --frontend ublk ...`` in the background."""

    def __init__(self, store: str, *options: str, env: dict[str, str] | None = None) -> None:
        self.log = WORK / f"server-{time.monotonic_ns()}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dedupblk.cli", "serve", store, "--frontend", "ublk",
                 *options],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=WORK,
                env=None if env is None else {**os.environ, **env},
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()  # printed once the device is started
        if not self.path:
            self.proc.wait()
            raise CheckFailed(f"server exited {self.proc.returncode}: {self.log.read_text()}")
        self.dev_id = int(self.path.removeprefix("/dev/ublkb"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def errors(self) -> str:
        return self.log.read_text()


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fio(dev: str, *extra: str) -> None:
    run(
        "fio", "--name=ublk-verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
        "--size=32M", "--ioengine=libaio", "--iodepth=16", "--direct=1", "--verify=crc32c",
        "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1", "--randseed=4321",
        *extra,
    )  # fmt: skip


def wait_for(predicate: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll for a kernel-side state change (not a timing assertion: the limit only bounds a
    hang, and is far above how long the change takes)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise CheckFailed(f"still waiting for {what} after {seconds:g} s")
        time.sleep(0.2)


# -- block --------------------------------------------------------------------------------------


def served_records(store: str) -> list[dict[str, object]]:
    """What `dedupblk list --json` says serves ``store``."""
    listed: list[dict[str, object]] = json.loads(cli("list", "--json").stdout)
    return [record for record in listed if record["store"] == store]


@contextmanager
def systemd_socket() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A datagram socket standing in for systemd's, and the environment that names it."""
    path = WORK / f"notify-{time.monotonic_ns()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(30)  # a bound on a hang: the datagram comes with the device's path
        yield listener, {"NOTIFY_SOCKET": str(path)}


def heard(systemd: socket.socket) -> str:
    """The next datagram the server sent to its NOTIFY_SOCKET."""
    try:
        return systemd.recv(4096).decode()
    except TimeoutError:
        raise CheckFailed("nothing sent to NOTIFY_SOCKET") from None


def block_checks() -> None:
    store = "/scratch/block-store"
    cli("create", store, "--size", "256M")
    notify = contextlib.ExitStack()
    # The first server's systemd, heard in the second check.
    systemd, notify_env = notify.enter_context(systemd_socket())

    with check("serve prints the device and runs hardened"):
        server = Server(store, env=notify_env)
        dev = server.path
        require(Path(dev).is_block_device(), f"{dev} is not a block device")
        queue = Path(f"/sys/block/ublkb{server.dev_id}/queue")
        require((queue / "logical_block_size").read_text().strip() == "4096", "logical block")
        require((queue / "physical_block_size").read_text().strip() == "4096", "physical block")
        require((queue / "discard_granularity").read_text().strip() == "4096", "discard")
        require((queue / "write_cache").read_text().strip() == "write back", "volatile cache")
        require((queue / "fua").read_text().strip() == "1", "fua")
        require(Path(f"/proc/{server.pid}/oom_score_adj").read_text().strip() == "-1000", "oom")
        status = Path(f"/proc/{server.pid}/status").read_text()
        locked = int(status.split("VmLck:")[1].split()[0])
        require(locked > 0, "mlockall did not lock anything")
        for task in Path(f"/proc/{server.pid}/task").iterdir():
            comm = (task / "comm").read_text().strip()
            if comm.startswith("iou-"):
                continue  # io_uring's own workers (kernel-side)
            flags = int((task / "stat").read_text().rsplit(")", 1)[1].split()[6])
            require(
                flags & IO_FLUSHER_FLAGS == IO_FLUSHER_FLAGS,
                f"thread {task.name} ({comm}) is not an IO_FLUSHER: flags {flags:#x}",
            )
        listed = [d for d in devices() if d.dev_id == server.dev_id]
        require(len(listed) == 1 and listed[0].state == "live", f"devices: {listed}")
        require(listed[0].server_pid == server.pid and listed[0].server_alive, f"{listed}")
        require(dev in cli("devices").stdout, "`dedupblk devices` does not list it")

    with check("systemd is told READY=1 once the device is ready"):
        said = heard(systemd)
        require(said == f"READY=1\nSTATUS=serving {store} as {dev}", f"systemd was told {said!r}")

    with check("dedupblk list shows the ublk server; devices --has-device finds it"):
        records = served_records(store)
        require(len(records) == 1, f"list --json: {records}")
        (record,) = records
        require(
            (record["frontend"], record["pid"], record["device"]) == ("ublk", server.pid, dev),
            f"list --json: {record}",
        )
        line = f"{store}  ublk  pid {server.pid}  {dev}"
        require(line in cli("list").stdout.splitlines(), f"list: {cli('list').stdout!r}")
        has = cli("devices", "--has-device", str(server.dev_id), ok=False)
        require(has.returncode == 0 and has.stdout == "", f"--has-device: {has}")
        has = cli("devices", "--has-device", str(server.dev_id + 1), ok=False)
        require(has.returncode == 1 and has.stdout == "", f"--has-device of another: {has}")

    with check("a failed serve leaves the running server, its device and record alone"):
        before = served_records(store)
        locked = cli("serve", store, "--frontend", "ublk", ok=False)  # the same store
        require(locked.returncode == 1 and "in use" in locked.stderr, f"{locked}")
        other = "/scratch/other-store"
        cli("create", other, "--size", "16M")
        taken = cli("serve", other, "--frontend", "ublk", "--dev-id", str(server.dev_id), ok=False)
        require(taken.returncode != 0 and taken.stdout == "", f"the same --dev-id: {taken}")
        require(served_records(store) == before, f"records now {served_records(store)}")
        require(served_records(other) == [], f"{served_records(other)}")
        listed = [d for d in devices() if d.dev_id == server.dev_id]
        require(len(listed) == 1 and listed[0].state == "live", f"devices: {listed}")
        require(server.proc.poll() is None, "the server exited")

    with check("the conformance suite passes on the device"):
        # tests/conformance.py, the suite the store and NBD run too, against /dev/ublkbN.
        done = subprocess.run([sys.executable, "-m", "tests.conformance", dev], cwd=REPO,
                              capture_output=True, text=True, check=False)  # fmt: skip
        print(done.stdout.strip())
        require(done.returncode == 0, f"exit {done.returncode}\n{done.stdout}{done.stderr}")
        passed = done.stdout.count("PASS ")
        require(passed >= 9 and f"{passed} passed, 0 failed" in done.stdout, done.stdout)

    with check("the conformance suite fails a translation that trims one page too many"):
        broken_store = "/scratch/broken-trim-store"
        cli("create", broken_store, "--size", "16M")
        broken = Server(broken_store, env={"PYTHONPATH": str(BROKEN_TRIM)})
        try:
            suite = [sys.executable, "-m", "tests.conformance", broken.path]
            done = subprocess.run(suite, cwd=REPO, capture_output=True, text=True, check=False)
        finally:
            code = broken.stop()
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL ")]
        require(done.returncode == 1 and "FAIL check_trim_and_zero" in failed, done.stdout)
        require(code == 0, f"the broken server exited {code}")

    with check("fio random 4K writes verify (crc32c)"):
        fio(dev, "--do_verify=1")

    with check("clean stop removes the device and leaves a clean store"):
        code = server.stop()
        require(code == 0, f"exit {code}: {server.errors()}")
        require(not Path(dev).exists(), f"{dev} still exists")
        require(devices() == [], f"devices left: {devices()}")
        cli("check", store)

    with check("fio verifies the same data after a restart"):
        server = Server(store)
        dev = server.path
        fio(dev, "--verify_only")

    mnt = WORK / "mnt"  # the guest's /mnt is the host's, read-only
    mnt.mkdir(exist_ok=True)
    with check("ext4: files, fsck, remount, checksums"):
        run("mkfs.ext4", "-q", "-F", dev)  # discards the whole device first
        run("mount", dev, str(mnt))
        unique = os.urandom(8 << 20)
        (mnt / "random.bin").write_bytes(unique)
        for i in range(4):
            (mnt / f"copy{i}.bin").write_bytes(unique)
        (mnt / "zeros.bin").write_bytes(bytes(8 << 20))
        small = mnt / "small"
        small.mkdir()
        for i in range(200):
            (small / f"f{i}").write_bytes(os.urandom(100 + 97 * i))
        files = [p for p in mnt.rglob("*") if p.is_file()]
        sums = {p: checksum(p) for p in files}
        run("umount", str(mnt))
        run("e2fsck", "-fn", dev)
        run("mount", dev, str(mnt))
        bad = [str(p) for p in files if checksum(p) != sums[p]]
        require(not bad, f"checksums differ after remount: {bad}")
        run("umount", str(mnt))
        usage = stats(store)
        require(usage["dedup_ratio"] > 1, f"four copies of one file did not dedup: {usage}")

    with check("blkdiscard lowers stored_pages"):
        before = stats(store)["stored_pages"]
        run("blkdiscard", dev)
        after = stats(store)["stored_pages"]
        require(after < before, f"stored_pages {before} -> {after}")
        print(f"stored_pages {before:.0f} -> {after:.0f}")

    with check("SIGKILL then --recover resumes I/O on the same device"):
        pattern = os.urandom(4 << 20)
        (WORK / "pattern").write_bytes(pattern)
        run("dd", f"if={WORK / 'pattern'}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync")
        dev_id = server.dev_id
        server.kill()
        wait_for(lambda: any(d.state == "quiesced" for d in devices()), "the quiesced device")
        (stale,) = devices()
        require(stale.dev_id == dev_id and not stale.server_alive, f"{stale}")
        require(Path(dev).exists(), f"{dev} disappeared with its server")
        reader = subprocess.Popen(
            ["dd", f"if={dev}", f"of={WORK / 'readback'}", "bs=1M", "count=4", "iflag=direct"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        server = Server(store, "--recover", str(dev_id))
        require(server.path == dev, f"recovered as {server.path}, not {dev}")
        _, reader_err = reader.communicate()
        require(reader.returncode == 0, f"read across the recovery failed: {reader_err}")
        require((WORK / "readback").read_bytes() == pattern, "data read after recovery differs")
        again = os.urandom(1 << 20)
        (WORK / "again").write_bytes(again)
        run("dd", f"if={WORK / 'again'}", f"of={dev}", "bs=1M", "seek=8", "oflag=direct")
        run("dd", f"if={dev}", f"of={WORK / 'again-read'}", "bs=1M", "skip=8", "count=1",
            "iflag=direct")  # fmt: skip
        require((WORK / "again-read").read_bytes() == again, "write after recovery differs")
        code = server.stop()
        require(code == 0, f"recovered server exit {code}: {server.errors()}")
        require(devices() == [], f"devices left: {devices()}")
        cli("check", store)

    with check("devices --cleanup deletes a dead server's device"):
        server = Server(store)
        server.kill()
        out = cli("devices", "--cleanup").stdout
        require(f"deleted ublk device {server.dev_id}" in out, f"cleanup said: {out!r}")
        require(devices() == [], f"devices left: {devices()}")
        require(not Path(server.path).exists(), f"{server.path} still exists")
        cli("check", store)

    with (
        check("dedupblk stop STORE stops the ublk server, which tells systemd STOPPING=1"),
        systemd_socket() as (systemd, notify_env),
    ):
        server = Server(store, env=notify_env)
        said = heard(systemd)
        require(said.startswith("READY=1\n"), f"systemd was told {said!r}")
        stopped = cli("stop", store)
        require(stopped.stdout == f"stopped {store} (ublk, pid {server.pid})\n", f"stop: {stopped}")
        code = server.proc.wait()
        require(code == 0, f"exit {code}: {server.errors()}")
        said = heard(systemd)
        require(said == f"STOPPING=1\nSTATUS=stopping {server.path}", f"systemd was told {said!r}")
        require(served_records(store) == [], f"still listed: {served_records(store)}")
        require(devices() == [], f"devices left: {devices()}")
        has = cli("devices", "--has-device", str(server.dev_id), ok=False)
        require(has.returncode == 1, f"--has-device after the stop: {has}")
        again = cli("stop", store, ok=False)
        require(again.returncode == 1 and "no server serves" in again.stderr, f"{again}")
        cli("check", store)
    notify.close()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a server's metrics endpoint, read by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics_checks() -> None:
    """``serve --metrics`` on a fresh store: N unique pages, then the same N again elsewhere."""
    store = "/scratch/metrics-store"
    port = 9464
    pages = 256
    cli("create", store, "--size", "64M")
    run("ip", "link", "set", "lo", "up")  # the guest's loopback starts down

    with check("serve --metrics: request counters and store gauges match what was written"):
        server = Server(store, "--metrics", str(port))
        unique = os.urandom(pages * PAGE)
        (WORK / "unique").write_bytes(unique)
        for seek in (0, 4 * pages):  # one 4 KiB write request a page, then a flush
            run("dd", f"if={WORK / 'unique'}", f"of={server.path}", "bs=4k", f"seek={seek}",
                "oflag=direct", "conv=fsync")  # fmt: skip
        found = scrape(port)
        label = ("store", store)

        def metric(name: str, **labels: str) -> float:
            return found.get((name, frozenset({label, *labels.items()})), -1.0)

        writes = metric("dedupblk_requests_total", op="write")
        require(writes >= 2 * pages, f"dedupblk_requests_total{{op=write}} {writes}")
        require(metric("dedupblk_requests_total", op="flush") >= 2, "flush requests")
        stored = metric("dedupblk_stored_bytes")
        require(stored == pages * PAGE, f"dedupblk_stored_bytes {stored}, not {pages * PAGE}")
        logical = metric("dedupblk_logical_bytes")
        require(logical == 2 * pages * PAGE, f"dedupblk_logical_bytes {logical}")
        require(metric("dedupblk_saved_bytes") == pages * PAGE, "dedupblk_saved_bytes")
        require(metric("dedupblk_commit_seconds_count") >= 1, "no commit timed")
        require(metric("dedupblk_flush_seconds_count") >= 2, "no flush timed")
        errors = [key for key, value in found.items()
                  if key[0] == "dedupblk_request_errors_total" and value]  # fmt: skip
        require(not errors, f"errors counted: {errors}")

    with check("stats shows the ublk server's counters"):

        def served() -> dict[str, object]:
            record = json.loads(cli("stats", store, "--json").stdout).get("served")
            return record if isinstance(record, dict) else {}

        def counted() -> bool:
            requests = served().get("requests")
            return isinstance(requests, dict) and requests.get("write", 0) >= 2 * pages

        wait_for(counted, "the counters file to show the writes")
        require(served().get("pid") == server.pid, f"served by {served().get('pid')}")
        shown = cli("stats", store).stdout
        require(f"pid {server.pid}" in shown and "write " in shown, shown)
        code = server.stop()
        require(code == 0, f"exit {code}: {server.errors()}")
        require("served" not in json.loads(cli("stats", store, "--json").stdout), "still served")
        cli("check", store)


# -- swap ---------------------------------------------------------------------------------------

DUPLICATES = [random.Random(1000 + k).randbytes(PAGE) for k in range(8)]
NOISE = random.Random(7).randbytes((1 << 20) + PAGE)


def page_content(i: int) -> bytes:
    """Page i of the memory hog: zero, one of 8 duplicates, unique, or same-filled."""
    kind = i % 4
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return DUPLICATES[(i // 4) % len(DUPLICATES)]
    if kind == 2:
        start = (i * 4088) % (1 << 20)
        return i.to_bytes(8, "little") + NOISE[start : start + PAGE - 8]
    return bytes([i % 251 + 1]) * PAGE


def allocate(nbytes: int, cgroup: str | None) -> None:
    # An ordinary process: drop the IO_FLUSHER flag inherited from the checks (stay_watchable),
    # so that its own reclaim swaps like anyone's.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_IO_FLUSHER, 0, 0, 0, 0) != 0:
        raise CheckFailed(f"prctl: {os.strerror(ctypes.get_errno())}")
    # Join the memory-limited cgroup first, so that every page below is charged to it.
    if cgroup is not None:
        Path(cgroup, "cgroup.procs").write_text(f"{os.getpid()}\n")
    pages = nbytes // PAGE
    memory = mmap.mmap(-1, pages * PAGE)
    for i in range(pages):
        memory[i * PAGE : (i + 1) * PAGE] = page_content(i)
    bad = sum(memory[i * PAGE : (i + 1) * PAGE] != page_content(i) for i in range(pages))
    print(f"allocated {pages} pages, {bad} differ", flush=True)
    # Hold the pages (most of them in swap) until the parent has looked at the store.
    print(HOG_HOLDING, flush=True)
    sys.stdin.readline()
    sys.exit(1 if bad else 0)


HOG_HOLDING = "holding the pages"


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise CheckFailed(f"no {field} in /proc/meminfo")


def vmstat(field: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == field:
            return int(value)
    raise CheckFailed(f"no {field} in /proc/vmstat")


def vmstat_or_zero(field: str) -> int:
    """A /proc/vmstat counter this kernel may not have (0 then)."""
    try:
        return vmstat(field)
    except CheckFailed:
        return 0


def swap_entry(dev: str) -> list[str] | None:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == dev:
            return fields
    return None


# How long swap-outs may stand still while the memory hog runs before the check calls it a
# deadlock.  Not a timing assertion: under TCG a healthy run moves pages every second or two, and
# this only turns a hang (which would otherwise last until the harness kills the VM) into a
# failure that shows the blocked tasks' kernel stacks.
SWAP_STALL_SECONDS = 120


def blocked_tasks(server_pid: int | None = None) -> str:
    """Kernel stacks of every task in uninterruptible sleep (what a deadlock looks like), and of
    every thread of the server whatever its state."""
    lines: list[str] = []
    for stat_path in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        try:
            state = stat_path.read_text().rsplit(")", 1)[1].split()[0]
            task = stat_path.parent
            if state != "D" and task.parent.parent.name != str(server_pid):
                continue
            lines.append(f"--- {task} {(task / 'comm').read_text().strip()} state {state}")
            lines.append((task / "stack").read_text())
        except OSError:
            continue
    return "\n".join(lines)


def server_threads(server_pid: int) -> str:
    """``comm:state:wchan`` of every thread of the server, on one line."""
    found = []
    for task in sorted(Path(f"/proc/{server_pid}/task").glob("[0-9]*")):
        try:
            comm = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip() or "-"
        except OSError:
            continue
        found.append(f"{comm}:{state}:{wchan}")
    return " ".join(found)


def heartbeat(server_pid: int, started: float) -> None:
    """One line of swap progress in the kernel log (the console: no filesystem on the way, so
    it still gets out of a guest whose other I/O hangs)."""
    counters = " ".join(f"{name} {vmstat_or_zero(name)}" for name in HEARTBEAT_COUNTERS)
    free = meminfo("MemFree") >> 10
    line = (
        f"swap-watch {time.monotonic() - started:.0f}s: {counters} MemFree {free} KiB; "
        f"server {server_threads(server_pid)}"
    )
    with contextlib.suppress(OSError), open("/dev/kmsg", "w") as kmsg:
        kmsg.write(line[:900] + "\n")
        for stack in sleeping_stacks(server_pid):
            kmsg.write(stack[:900] + "\n")


def sleeping_stacks(server_pid: int) -> list[str]:
    """The kernel stack, on one line, of each server thread in uninterruptible sleep."""
    found = []
    for task in sorted(Path(f"/proc/{server_pid}/task").glob("[0-9]*")):
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "D":
                continue
            frames = [line.split()[-1] for line in (task / "stack").read_text().splitlines()]
        except (OSError, IndexError):
            continue
        found.append(f"swap-watch stack {task.name}: {' < '.join(frames)}")
    return found


HEARTBEAT_COUNTERS = ("pswpin", "pswpout", "pgmajfault", "allocstall_normal", "oom_kill")
HEARTBEAT_SECONDS = 20


def run_watching_swap(
    argv: list[str], server: Server, while_holding: Callable[[], None]
) -> tuple[int, str]:
    """Run the memory hog; fail (with the blocked tasks' stacks) if swap I/O stops moving.

    ``while_holding`` runs once the hog has verified its pages and still holds them."""
    with (WORK / "hog.out").open("w+") as out:
        hog = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                               cwd=WORK)  # fmt: skip
        assert hog.stdin is not None
        moved, last_move = -1, time.monotonic()
        started = beat = time.monotonic()
        while hog.poll() is None:
            time.sleep(1)
            if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                heartbeat(server.pid, started)
                beat = time.monotonic()
            if HOG_HOLDING in (WORK / "hog.out").read_text():
                while_holding()
                hog.stdin.close()
                hog.wait()
                break
            # Swap-outs, not swap-ins: a server stuck on writes may still serve reads.
            now = vmstat("pswpout")
            if now != moved:
                moved, last_move = now, time.monotonic()
            elif time.monotonic() - last_move > SWAP_STALL_SECONDS:
                stacks = blocked_tasks(server.pid) + Path("/proc/meminfo").read_text()
                # Unwedge the guest so that it can still power off: without its server the
                # device's requests fail once it is deleted, and reclaim moves on.
                server.kill()
                hog.kill()
                subprocess.run([sys.executable, "-m", "dedupblk.cli", "devices", "--cleanup"],
                               check=False, cwd=WORK)  # fmt: skip
                raise CheckFailed(
                    f"no swap-out for {SWAP_STALL_SECONDS} s while the hog runs (deadlock)\n"
                    f"{stacks[-12000:]}"
                )
        out.seek(0)
        return hog.returncode, out.read()


# swap-cgroup: the hog runs in a memory cgroup limited to HOG_MEMORY_MAX and allocates 1.5 times
# that, so the pressure (and the swapping) is the hog's own: the rest of the guest keeps free
# memory.
HOG_MEMORY_MAX = 160 << 20
# The swap store: a 1 GiB device.  Its preallocated slot file is smaller than the device (the
# hog's pages dedup to about a quarter) so that it fits /scratch next to the metadata.
SWAP_STORE_SIZE = "1G"
SWAP_BACKEND_SIZE = "512M"
# The blockdev placement's slots: the harness's raw disk.  Boot with RAW_DISK_MB: room for the
# pages a 1.5 x MemAvailable hog in a 768 MiB guest leaves after dedup (about a quarter of them
# unique), with the free space a 1 GiB device's overwrites need while they wait for a commit.
RAW_DISK = "/dev/vdb"
RAW_DISK_MB = 640


def hog_cgroup(limit: int) -> str:
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        run("mount", "-t", "cgroup2", "cgroup2", str(root))
    (root / "cgroup.subtree_control").write_text("+memory\n")
    group = root / "ublk-hog"
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(f"{limit}\n")
    return str(group)


def swap_pages_of_hog(cgroup: str | None) -> int:
    """Pages the memory hog has in swap now: its cgroup's, or its own VmSwap without one."""
    if cgroup is not None:
        return int(Path(cgroup, "memory.swap.current").read_text()) // PAGE
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"allocate" in cmdline and "VmSwap:" in text:
            return int(text.split("VmSwap:")[1].split()[0]) * 1024 // PAGE
    raise CheckFailed("the memory hog is gone")


def stay_watchable() -> None:
    """Keep this process able to report a hang: lock its memory (its pages must not wait in
    swap on the device under test) and let the kernel's hung-task reports, stacks included,
    reach the console (the harness shows its tail when the VM times out)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise CheckFailed(f"mlockall: {os.strerror(ctypes.get_errno())}")
    # Nor may its own allocations wait on swap writes to that device (set_io_flusher: the
    # server's own protection, inherited by the commands this process runs).
    set_io_flusher()
    Path("/proc/sys/kernel/printk").write_text("7\n")
    # Every hung-task report, each with every CPU's backtrace (a task spinning in reclaim is
    # not "hung", but it is on a CPU).
    Path("/proc/sys/kernel/hung_task_warnings").write_text("-1\n")
    with contextlib.suppress(OSError):
        Path("/proc/sys/kernel/hung_task_all_cpu_backtrace").write_text("1\n")


def swap_checks(*, whole_machine: bool, placement: str) -> None:
    stay_watchable()

    with check("a swap store on tmpfs is refused"):
        cli("create", "/tmp/tmpfs-store", "--size", "64M")
        refused = cli("serve", "/tmp/tmpfs-store", "--frontend", "ublk", "--swap", ok=False)
        require(refused.returncode == 2, f"exit {refused.returncode}: {refused.stderr}")
        require("tmpfs" in refused.stderr, f"message: {refused.stderr!r}")
        require(devices() == [], f"a refused serve left devices: {devices()}")

    store = "/scratch/swap-store"
    files = ["slots", "meta/data.mdb", "meta/lock.mdb"]  # the preallocated ones, under the store
    if placement == "blockdev":
        # The README's swap placement: metadata on ramfs (no writeback, never swapped), slots on a
        # block device (/dev/vdb): their O_DIRECT I/O takes no bio from the pool that the
        # kernel's swap-outs take theirs from.
        Path("/run/dedupblk").mkdir()
        run("mount", "-t", "ramfs", "-o", "mode=700", "ramfs", "/run/dedupblk")
        store, files = "/run/dedupblk/swap", ["meta/data.mdb"]
        cli("create", store, "--size", SWAP_STORE_SIZE, "--backend", RAW_DISK, "--preallocate")
    elif placement == "file-slots":
        # Metadata on ramfs, slots in a preallocated file on a disk mounted lazytime (timestamps
        # not journalled).
        run("mount", "-o", "remount,lazytime", "/scratch")
        Path("/run/dedupblk").mkdir()
        run("mount", "-t", "ramfs", "-o", "mode=700", "ramfs", "/run/dedupblk")
        store, files = "/run/dedupblk/swap", ["/scratch/swap.slots"]
        cli("create", store, "--size", SWAP_STORE_SIZE, "--backend", files[0],
            "--backend-size", SWAP_BACKEND_SIZE, "--preallocate")  # fmt: skip
    elif placement == "disk":
        run("mount", "-o", "remount,lazytime", "/scratch")
        cli("create", store, "--size", SWAP_STORE_SIZE, "--backend-size", SWAP_BACKEND_SIZE,
            "--preallocate")  # fmt: skip
    else:
        cli("create", store, "--size", SWAP_STORE_SIZE)
    # The other placements are measured to hang: kept to compare, so their risk is accepted.
    risk = [] if placement == "blockdev" else ["--swap-placement-may-hang"]
    with check("serve --swap enables swap with the priority asked, wbt off"):
        server = Server(store, "--swap", "--swap-priority", "10", "--swap-discard", *risk)
        entry = swap_entry(server.path)
        require(entry is not None, f"{server.path} not in /proc/swaps")
        assert entry is not None
        require(entry[4] == "10", f"priority {entry[4]}")
        # blk-wbt would cut reclaim's swap-outs to one in flight (see _disable_writeback_throttling)
        wbt = Path(f"/sys/block/{Path(server.path).name}/queue/wbt_lat_usec")
        require(wbt.read_text().strip() == "0", f"wbt_lat_usec {wbt.read_text().strip()}")

    with check("a memory hog swaps to the device and gets every byte back"):
        if whole_machine:
            cgroup = None
            pressure = meminfo("MemAvailable")
        else:
            cgroup = hog_cgroup(HOG_MEMORY_MAX)
            pressure = HOG_MEMORY_MAX
        hog = pressure * 3 // 2 // PAGE * PAGE
        swapped_before = vmstat("pswpout")
        zero_before = vmstat_or_zero("swpout_zero")
        holding: dict[str, float] = {}

        def look_while_holding() -> None:
            holding.update(stats(store))
            holding["hog_pages_in_swap"] = swap_pages_of_hog(cgroup)
            # How the kernel's count of swapped pages relates to the store's mappings: zero
            # pages only mark a bitmap (6.12: vmstat swpout_zero), never reach the device, and
            # same-filled pages are fill entries, not mapped slots.
            holding["swap_used_pages"] = (meminfo("SwapTotal") - meminfo("SwapFree")) // PAGE
            holding["swap_cached_pages"] = meminfo("SwapCached") // PAGE
            holding["swpout_zero"] = vmstat_or_zero("swpout_zero") - zero_before

        argv = [sys.executable, __file__, "allocate", str(hog)]
        code, output = run_watching_swap(
            argv + ([] if cgroup is None else [cgroup]), server, look_while_holding
        )
        print(output.strip())
        require(code == 0, f"hog exit {code}: {output}")
        swapped = vmstat("pswpout") - swapped_before
        where = (
            "no cgroup (whole guest)"
            if cgroup is None
            else f"cgroup swap peak {Path(cgroup, 'memory.swap.peak').read_text().strip()}"
        )
        print(
            f"memory pressure {pressure >> 20} MiB, hog {hog >> 20} MiB, swapped {swapped} "
            f"pages, {where}"
        )
        require(swapped * PAGE > pressure // 4, f"only {swapped} pages were swapped out")

    with check("dedup of swapped pages"):
        # Taken while the hog held its pages: a quarter of them are unique, the rest zero (never
        # written to the device: 6.12 keeps a bitmap), same-filled (fill entries) or one of 8
        # duplicates, so the store keeps about a third of the pages written to the device.
        # Without a cgroup most of the hog is back in memory after its verify pass (a swapped-in
        # page keeps its swap slot while it is in the swap cache), so compare with the slots in
        # use, not the hog's VmSwap.
        print(json.dumps(holding))
        in_swap = holding["hog_pages_in_swap"] if cgroup else holding["swap_used_pages"]
        require(
            holding["stored_pages"] * 3 < in_swap * 2,
            f"stored {holding['stored_pages']} pages for {in_swap} pages in swap",
        )
        require(holding["dedup_ratio"] > 1, f"dedup_ratio {holding['dedup_ratio']}")
        print(f"stored {holding['stored_pages']:.0f} pages for {in_swap:.0f} pages in swap")

    with check("swap discards reach the store once the hog is gone"):
        wait_for(
            lambda: stats(store)["mapped_pages"] < holding["mapped_pages"] / 2,
            "the freed swap slots to be discarded",
        )
        print(json.dumps(stats(store)))

    with check("stop: swapoff, device removed, store clean"):
        code = server.stop()
        require(code == 0, f"exit {code}: {server.errors()}")
        require(swap_entry(server.path) is None, "still in /proc/swaps")
        require(devices() == [], f"devices left: {devices()}")
        cli("check", store)

    if placement != "unsafe":
        with check("the preallocated store was never punched nor extended"):
            for name in files:
                path = Path(store, name)
                size, allocated = path.stat().st_size, path.stat().st_blocks * 512
                require(allocated >= size, f"{name}: {allocated} bytes allocated of {size}")
                print(f"{name}: {size} bytes, all allocated")
            if placement in ("blockdev", "file-slots"):
                warnings = ("not on ramfs", "lazytime", "--preallocate", "disk filesystem")
                advice = [w for w in warnings if w in server.errors()]
                expected = ["disk filesystem"] if placement == "file-slots" else []
                require(advice == expected, f"placement warnings: {server.errors()}")
            grown = "outgrew its preallocated" in server.errors()
            require(not grown, f"the metadata outgrew its preallocation: {server.errors()}")


def main() -> None:
    group = sys.argv[1]
    if group == "allocate":
        allocate(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    elif group == "block":
        block_checks()
        metrics_checks()
    elif group == "swap":
        swap_checks(whole_machine=True, placement="blockdev")
    elif group == "swap-cgroup":
        swap_checks(whole_machine=False, placement="blockdev")
    elif group == "swap-file-slots":
        swap_checks(whole_machine=True, placement="file-slots")
    elif group == "swap-disk-meta":
        swap_checks(whole_machine=True, placement="disk")
    elif group == "swap-unsafe":
        swap_checks(whole_machine=True, placement="unsafe")
    else:
        sys.exit(f"unknown group {group!r}")
    print(f"all {group} checks passed", flush=True)


if __name__ == "__main__":
    main()
