"""RAM benchmark (issue 11): what K containers' swap costs in RAM, zram alone vs dedupblk over zram.

    .venv/bin/python bench/ram_bench.py [--containers 3,1] [--rounds 1] [--json results.json]
        [--start together|one-by-one] [--fill direct|buffered]

One guest boot (testbed/vm.py: Debian's 6.12 kernel under qemu TCG, 1536 MiB, 2 CPUs) runs
bench/ram_guest.py.  The workload (bench/ram_workload.py) is K containers from one image: each a
process holding a private anonymous mapping of 480/K MiB, its first half the same real files of
/usr/lib/x86_64-linux-gnu in every container, its second half files of its own, in a cgroup with
``memory.max`` 160 MiB that pushes most of it to swap.  The containers start together
(``--start one-by-one``: each once the previous holds) and read each file straight into their
mapping, so every page is written once and next to nothing is swapped back in (``--fill
buffered``: each file read into a buffer, then copied, which swaps pages out more than once; see
bench/ram_guest.py).  For each K the same workload swaps first to /dev/zram0 alone (1 GiB,
lz4), then to dedupblk (``serve --frontend ublk --swap``) whose store directory is preallocated
on ramfs and whose slots are a second 1 GiB lz4 zram; the order alternates from round to round.
Once every container holds its pages, the guest reads:

- zram alone: ``mem_used_max`` of /dev/zram0;
- dedupblk: ``mem_used_max`` of its slots' zram, the store directory on ramfs (``du -sk``), and
  the server's ``Anonymous:`` from /proc/PID/smaps_rollup; their sum is its total.

The floor is counted here on the host from the same file selection (the guest checks that its
layout has the same digest): the share of the workload's 4 KiB pages that any store must keep
(distinct contents among the non-zero pages, over all pages; a file's last page counts with its
zero padding, as in the mapping).  It is a floor before compression: dedupblk over zram cannot
go below about that share of zram alone.  Issue 11's goals: K = 3 at most 0.8x the RAM of zram
alone, K = 1 (every page distinct) at most 1.15x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ram_workload  # bench/ is sys.path[0] for a script here

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.vm import Harness  # noqa: E402 -- needs the repository on sys.path first

GUEST = REPO / "bench" / "ram_guest.py"
PYTHON = REPO / ".venv" / "bin" / "python"
RESULT_PREFIX = "RESULT "
MEMORY_MB = 1536
GOALS = {3: 0.8, 1: 1.15}  # issue 11: dedupblk's total over zram alone, at most
MIB = 1 << 20


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def zram_alone(results: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The zram-alone run of the same K and round as ``run``."""
    return next(
        r for r in results
        if r["device"] == "zram" and r["containers"] == run["containers"]
        and r["round"] == run["round"]
    )  # fmt: skip


def print_table(results: list[dict[str, Any]], floors: dict[int, ram_workload.Floor]) -> None:
    head = (f"{'K':>2} {'device':<9} {'round':>5} {'out':>5} {'in':>5} {'zero':>5} {'zram':>5} "
            f"{'meta':>5} {'server':>6} {'total':>5} {'x zram':>6} {'stored':>7} {'stale':>6} "
            f"{'flush':>5} {'exit:st':>7} {'stale':>6}")  # fmt: skip
    print(head)
    print(f"{'':>2} {'':<9} {'':>5} {'MiB':>5} {'MiB':>5} {'pages':>5} {'MiB':>5} {'MiB':>5} "
          f"{'MiB':>6} {'MiB':>5} {'':>6} {'pages':>7} {'pages':>6} {'':>5} {'pages':>7} "
          f"{'pages':>6}")  # fmt: skip
    print("-" * len(head))
    for r in results:
        ratio = r["total_bytes"] / zram_alone(results, r)["total_bytes"]
        stored = r["store"]["stored_pages"] if "store" in r else "-"
        print(
            f"{r['containers']:>2} {r['device']:<9} {r['round'] + 1:>5} "
            f"{r['pswpout'] * ram_workload.PAGE / MIB:5.0f} "
            f"{r['pswpin'] * ram_workload.PAGE / MIB:5.0f} {r['swpout_zero']:>5} "
            f"{mib(r['zram_bytes']):>5} {mib(r.get('meta_bytes')):>5} "
            f"{mib(r.get('server_anon_bytes')):>6} {mib(r['total_bytes']):>5} {ratio:6.2f} "
            f"{stored:>7} {r.get('stale_pages', '-'):>6} {r['device_flushes']:>5} "
            f"{r.get('exit_stored_pages', '-'):>7} {r.get('exit_stale_pages', '-'):>6}"
        )
    print()
    print(f"{'K':>2} {'dedupblk / zram':>16} {'goal':>6} {'floor':>6} {'pages':>7} "
          f"{'distinct':>9} {'zero':>6}")  # fmt: skip
    for k, floor in floors.items():
        ratios = [
            r["total_bytes"] / zram_alone(results, r)["total_bytes"]
            for r in results
            if r["containers"] == k and r["device"] == "dedupblk"
        ]
        shown = f"{statistics.median(ratios):.2f}" if ratios else "-"
        goal = f"{GOALS[k]:.2f}" if k in GOALS else "-"
        print(f"{k:>2} {shown:>16} {goal:>6} {floor.share:6.3f} {floor.pages:>7} "
              f"{floor.distinct_pages:>9} {floor.zero_pages:>6}")  # fmt: skip
    print(
        "(out, in: pswpout and pswpin while the containers filled; zero: pages swapped out that "
        "the kernel found zero and kept off the device (swpout_zero); zram: mem_used_max of "
        "zram0 alone, or of dedupblk's slots; meta: the store directory on ramfs (du); server: "
        "its Anonymous RSS; x zram: total over zram alone in the same round; stored: the "
        "store's stored_pages; stale: pages zram holds that no page of the store names; flush: "
        "flush requests the swap device completed; exit: stored and stale pages once the "
        "containers exited and swap's discards settled; "
        "dedupblk / zram: median of rounds; floor: distinct non-zero pages over all pages, "
        "before compression)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", default="3,1", help="K values (default 3,1)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--start", choices=("together", "one-by-one"), default="together",
        help="the containers fill at the same time (default), or each after the previous holds",
    )  # fmt: skip
    parser.add_argument(
        "--fill", choices=("direct", "buffered"), default="direct",
        help="each file read straight into the mapping (default), or into a buffer first",
    )  # fmt: skip
    parser.add_argument(
        "--discard", choices=("on", "off"), default="on",
        help="the dedupblk device's swap discards (serve's default: on)",
    )  # fmt: skip
    parser.add_argument("--json", help="write every measurement (and the floors) here")
    parser.add_argument("--timeout", type=float, default=2400, help="VM timeout, seconds")
    args = parser.parse_args(argv)
    ks = list(dict.fromkeys(int(k) for k in args.containers.split(",") if k))
    if not ks or min(ks) < 1 or args.rounds < 1:
        parser.error("give K values of at least 1 and at least one round")
    if not PYTHON.exists():
        parser.error(f"{PYTHON} is missing: run `make setup` first")
    files = ram_workload.select_files()
    floors: dict[int, ram_workload.Floor] = {}
    digests: dict[int, str] = {}
    for k in ks:
        containers = ram_workload.layout(files, k)
        digests[k] = ram_workload.digest(containers)
        floors[k] = ram_workload.floor(containers)
    expect = ",".join(f"{k}={digest}" for k, digest in digests.items())
    command = (
        f"{PYTHON} {GUEST} --containers {','.join(map(str, ks))} --rounds {args.rounds} "
        f"--start {args.start} --fill {args.fill} --discard {args.discard} --expect {expect}"
    )
    harness = Harness.prepare()
    started = time.monotonic()
    result = harness.run(command, timeout=args.timeout, memory_mb=MEMORY_MB, scratch_mb=0)
    results: list[dict[str, Any]] = [
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
    elapsed = time.monotonic() - started
    print(f"{len(files)} files of {ram_workload.LIB_DIR}; the VM ran {elapsed:.0f} s")
    print_table(results, floors)
    if args.json:
        floors_json = {k: {"pages": f.pages, "zero_pages": f.zero_pages,
                           "distinct_pages": f.distinct_pages, "share": f.share}
                       for k, f in floors.items()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"results": results, "floors": floors_json},
                                              indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
