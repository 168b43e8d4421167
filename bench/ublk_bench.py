"""ublk benchmark: the same fio jobs against dedupblk's /dev/ublkbN and the kernel's /dev/zram0.

    .venv/bin/python bench/ublk_bench.py [--rounds 2] [--runtime 10] [--size 128M]
        [--jobs rand-write-dup50,rand-read,dedup-90]
        [--devices ublk,ublk-ram,ublk-minimal,store,store-ram,zram]
        [--profile] [--baseline CHECKOUT] [--json results.json]

One guest boot (testbed/vm.py: Debian's 6.12 kernel under qemu TCG, 2 CPUs) runs
bench/ublk_guest.py, which for every round and job serves a fresh store (on the guest's ext4
/scratch) with ``dedupblk serve --frontend ublk`` and then resets /dev/zram0 to the same size,
running the job file's block-device command line against each in turn (ublk, zram, ublk, zram...).
TCG makes absolute numbers meaningless; the ratio ublk/zram, measured in the same guest, is the
figure.  The table shows the median of the rounds.  ``ublk-ram`` is the swap placement
(metadata preallocated on ramfs, slots on a second zram: a volatile store), ``store-ram`` the
store alone placed so.  Two more rows split dedupblk's time: ``ublk-minimal``
(bench/minimal_ublk.py: the same frontend over a RAM disk, the ceiling for a Python ublk
server) and ``store`` (the store alone in the guest, the job's writes issued from
Python in passes of the job's depth, write jobs only).  Per request, ublk is about ublk-minimal
plus store (the us/req column).  ``--devices ...,ublk-zram`` adds dedupblk with its slots on a
second zram device (metadata still on /scratch).  ``--baseline CHECKOUT`` (a worktree of an
earlier commit, with its own .venv from ``make venv``) allows ``--devices ...,baseline,
baseline-store``: ublk and store served by that checkout's code, alternated with this one's in
the same guest (before and after a change).  ``--profile`` adds one cProfiled ublk run of the
first job (queue threads only) and prints its top functions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ublk_guest import DEVICES  # noqa: E402 -- bench/ is sys.path[0] for a script here

from testbed.vm import Harness  # noqa: E402 -- needs the repository on sys.path first

GUEST = REPO / "bench" / "ublk_guest.py"
PYTHON = REPO / ".venv" / "bin" / "python"
RESULT_PREFIX = "RESULT "


def _ratio(numerator: float, denominator: float, spec: str) -> str:
    """``numerator / denominator`` formatted with ``spec``, or a dash in its width for a zero."""
    if not denominator:
        return "-".rjust(int(spec.split(".", maxsplit=1)[0]))
    return format(numerator / denominator, spec)


def print_table(results: list[dict[str, float | str]]) -> None:
    jobs = list(dict.fromkeys(str(r["job"]) for r in results))
    head = f"{'job':<18} {'device':<20} {'IOPS':>9} {'MiB/s':>8} {'p99 us':>9} {'us/req':>8}"
    print(head)
    print("-" * len(head))
    for job in jobs:
        medians: dict[str, dict[str, float]] = {}
        for device in DEVICES:
            runs = [r for r in results if r["job"] == job and r["device"] == device]
            if not runs:
                continue
            medians[device] = {
                key: statistics.median(float(r[key]) for r in runs)
                for key in ("iops", "mib_s", "p99_us")
            }
            m = medians[device]
            print(
                f"{job:<18} {device:<20} {m['iops']:9.0f} {m['mib_s']:8.1f} {m['p99_us']:9.0f} "
                f"{_ratio(1e6, m['iops'], '8.1f')}"
            )
        z = medians.get("zram")
        for device in DEVICES:
            u = medians.get(device)
            if u is None or z is None or device in ("store", "baseline-store", "store-ram", "zram"):
                continue
            print(
                f"{job:<18} {device + '/zram':<20} {_ratio(u['iops'], z['iops'], '9.2f')} "
                f"{_ratio(u['mib_s'], z['mib_s'], '8.2f')} "
                f"{_ratio(u['p99_us'], z['p99_us'], '9.2f')}"
            )
    print("(median of rounds; ratio = device / zram: higher is better for IOPS and MiB/s, lower "
          "for p99; us/req = 1e6 / IOPS; store: the store alone, its p99 is a pass's)")  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per timed job")
    parser.add_argument("--size", default="128M", help="device size and fio SIZE")
    parser.add_argument("--jobs", default="rand-write-dup50,rand-read,dedup-90")
    parser.add_argument(
        "--devices",
        default="ublk,ublk-ram,ublk-minimal,store,store-ram,zram",
        help=f"of {', '.join(DEVICES)}",
    )
    parser.add_argument("--profile", action="store_true", help="add a cProfiled ublk run")
    parser.add_argument(
        "--baseline", help="a checkout with its own .venv, for the baseline devices"
    )
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--timeout", type=float, default=1800, help="VM timeout, seconds")
    args = parser.parse_args(argv)
    if args.runtime <= 0:
        parser.error("--runtime must be at least 1 second")
    if not PYTHON.exists():
        parser.error(f"{PYTHON} is missing: run `make setup` first")
    command = (
        f"{PYTHON} {GUEST} --rounds {args.rounds} --runtime {args.runtime} --size {args.size} "
        f"--jobs {args.jobs} --devices {args.devices}"
        + (" --profile /tmp/ublk-profile" if args.profile else "")
        + (f" --baseline {Path(args.baseline).resolve()}" if args.baseline else "")
    )
    harness = Harness.prepare()
    result = harness.run(command, timeout=args.timeout, memory_mb=2048, scratch_mb=1024)
    results = [
        json.loads(line.removeprefix(RESULT_PREFIX))
        for line in result.output.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]
    for line in result.output.splitlines():
        if not line.startswith(RESULT_PREFIX):
            print(line, file=sys.stderr)
    if result.returncode != 0:
        print(f"guest command failed (exit {result.returncode})", file=sys.stderr)
        print(result.console[-4000:], file=sys.stderr)
        return 1
    print(f"guest: {command}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
