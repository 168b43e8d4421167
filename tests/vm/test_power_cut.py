"""Power cuts: a store on ext4 keeps its promise when the whole VM is killed while it writes.

After a cut at any moment the store opens, ``check`` is clean, and every page reads as its last
flushed content or as a write issued after that flush; never older data, never another page's.
Each cycle (testbed/power_cut.py, guest side in guest/power_cut.py): boot 1 writes through the
store with aggressive writeback and flushes every ~200 operations, and qemu gets SIGKILL 5 to
40 s after the writing started; boot 2, on the same disk image, checks, opens and reads the
store against the writer's log of flushes.

The seed of the first cycle is printed (and in the failure message); ``POWER_CUT_SEED=N`` runs
the same workloads with the same cut delays again. The delay counts from the writer's start, so
under TCG a cut lands near the same operation, not exactly on it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from testbed.power_cut import Cycle, run_cycle
from testbed.vm import Harness

CYCLES = 3
# Cycles more, one at a time, while every cycle so far was inconclusive (nothing written after
# its last flush had reached the disk: it could not have failed).
EXTRA_CYCLES = 2


def test_power_cuts(vm: Harness, tmp_path: Path) -> None:
    seed = int(os.environ.get("POWER_CUT_SEED") or random.randrange(1 << 31))
    print(f"power-cut seed {seed} (POWER_CUT_SEED={seed} runs these cycles again)")
    cycles: list[Cycle] = []
    while len(cycles) < CYCLES or (
        len(cycles) < CYCLES + EXTRA_CYCLES and all(cycle.inconclusive for cycle in cycles)
    ):
        number = len(cycles)
        cycle = run_cycle(vm, seed + number, tmp_path / f"cycle-{number}")
        print(cycle.summary())
        cycles.append(cycle)
    report = [f"POWER_CUT_SEED={seed}; disk images and logs under {tmp_path}"]
    for cycle in cycles:
        report.append(cycle.summary())
        report += [f"  {line}" for line in cycle.failures]
    assert not any(cycle.failures for cycle in cycles), "\n".join(report)
    # A pass must have been able to fail: in some cycle, writes issued after the last flush
    # reached the disk (if none ever does, the workload needs more commits between flushes).
    assert not all(cycle.inconclusive for cycle in cycles), "\n".join(report)
