"""Power-cut benchmark: N cycles of write, cut and verify, then how the store fared.

    .venv/bin/python bench/power_cut.py [--cycles 20] [--writeback aggressive|default]
        [--backend inside|file] [--seed N] [--size-mb 16] [--keep DIR] [--json results.json]

Each cycle (testbed/power_cut.py, guest side in tests/vm/guest/power_cut.py) boots a VM whose
store on ext4 is written with a flush every ~200 operations until qemu gets SIGKILL 5 to 40 s in,
then boots again on the same disk image to check, open and read the store against the writer's
log of flushes. ``--writeback aggressive`` writes dirty pages back after 50 ms (so that commits
after the last flush reach the disk before the cut); ``default`` keeps the kernel's 5 s / 30 s.
``--backend file`` puts the slots in a file beside the store directory instead of inside it.

A cycle *fails* if the store does not open, a check finds a problem (before or after the
reopen), or a page reads as neither its last flushed content nor a write issued after it (older
data, another page's, unrecognised bytes, or a read error). A cycle that passed although no page
read as written after the last flush is *inconclusive*: nothing written after it was on the disk.
Cycles are seeded (``--seed``, default random; cycle i uses seed + i) and the seed is printed.
A cycle that went wrong on the harness's side (no verdict) is counted apart, with its reason.
About 1 to 2 minutes per cycle under TCG.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.power_cut import Cycle, CycleError, run_cycle  # noqa: E402 -- REPO on sys.path first
from testbed.vm import Harness, VMError  # noqa: E402


def print_table(cycles: list[Cycle], errors: int) -> None:
    failed = [c for c in cycles if c.failures]
    older = sum(c.count("older") for c in cycles)
    other = sum(c.count("other_page") for c in cycles)
    unrecognised = sum(c.count("unrecognised") + c.count("unreadable") for c in cycles)
    row = {
        "cycles": str(len(cycles)),
        "opened": str(sum(c.opened for c in cycles)),
        "clean": str(sum(c.clean for c in cycles)),
        "pages checked": str(sum(c.pages_checked for c in cycles)),
        "bad pages (older / other page's / unrecognised)": (
            f"{older + other + unrecognised} ({older} / {other} / {unrecognised})"
        ),
        "failed": str(len(failed)),
        "inconclusive": str(sum(c.inconclusive for c in cycles)),
        "harness errors": str(errors),
    }
    print(" | ".join(row))
    print(" | ".join(value.rjust(len(name)) for name, value in row.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--writeback", choices=("aggressive", "default"), default="aggressive")
    parser.add_argument("--backend", choices=("inside", "file"), default="inside")
    parser.add_argument("--seed", type=int, help="seed of the first cycle (default: random)")
    parser.add_argument("--size-mb", type=int, default=16, help="the store's device size")
    parser.add_argument("--keep", type=Path, help="keep each cycle's disk image and log here")
    parser.add_argument("--json", type=Path, help="write every cycle's verdict to this file")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(
        f"power cuts: {args.cycles} cycles, writeback {args.writeback}, backend {args.backend}, "
        f"seed {seed}",
        flush=True,
    )
    harness = Harness.prepare()
    cycles: list[Cycle] = []
    errors = 0
    with tempfile.TemporaryDirectory(prefix="power-cut-") as scratch:
        root = args.keep or Path(scratch)
        for number in range(args.cycles):
            try:
                cycle = run_cycle(
                    harness,
                    seed + number,
                    root / f"cycle-{seed + number}",
                    writeback=args.writeback,
                    backend=args.backend,
                    size_mb=args.size_mb,
                )
            except (CycleError, VMError) as exc:
                errors += 1
                print(f"seed {seed + number}: harness error: {exc}", flush=True)
                continue
            cycles.append(cycle)
            print(cycle.summary(), flush=True)
            for line in cycle.failures:
                print(f"  {line}", flush=True)
    print()
    print_table(cycles, errors)
    if args.json:
        args.json.write_text(json.dumps([{"seed": c.seed, **c.verdict} for c in cycles], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
