"""Power cuts of a store in the VM: one cycle is a writer killed with the VM, then a verifier.

The promise (issue 12): after a cut at any moment, a store on a disk filesystem
opens, ``check`` is clean, and every page reads as its last flushed content or as a write issued
after that flush. A cycle tests it with two boots on one kept disk image (see testbed/vm.py):

1. ``tests/vm/guest/power_cut.py write``: the store on ext4 on /scratch, writeback as asked;
   after each flush the writer logs the last operation it covers to /export (the host keeps it).
   qemu gets SIGKILL a random moment (from the seed) after the writer's start marker: the
   guest's page cache is lost, what it had written to its disk is kept.
2. ``... verify``: the same image; the guest checks, opens and reads the store against the log
   and prints one result line.

`run_cycle` raises `CycleError` when the cycle itself went wrong (the writer stopped before
the cut, the verifier printed no result): that is no verdict on the store. Everything the
verifier found is in the returned `Cycle`. Used by tests/vm/test_power_cut.py and
bench/power_cut.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from tests.vm.guest.power_cut import MARKER, RESULT_PREFIX

from .vm import Harness, make_scratch_image

GUEST = Path(__file__).resolve().parents[1] / "tests" / "vm" / "guest" / "power_cut.py"
KILL_WINDOW = (5.0, 40.0)  # seconds after the writer's marker, drawn from the seed
IMAGE_MB = 128  # the ext4 /scratch holding the store
LOG = "/export/log"
_BOOT_ALLOWANCE = 300.0  # seconds for a boot and the writer's start, above the kill delay
_VERIFY_TIMEOUT = 1800.0
_SHOWN_PROBLEMS = 3  # per check pass, in `Cycle.failures`


class CycleError(RuntimeError):
    """The cycle could not run to a verdict (a harness or workload failure, not the store's)."""


@dataclasses.dataclass(frozen=True)
class Cycle:
    """What one power cut left: the verifier's findings (`verdict`, see the guest script)."""

    seed: int
    kill_delay: float  # seconds after the writer's marker
    verdict: dict[str, Any]
    write_output: str
    verify_output: str
    write_seconds: float  # boot 1, from starting qemu to its SIGKILL
    verify_seconds: float  # boot 2

    @property
    def _read(self) -> dict[str, Any]:
        read: dict[str, Any] = self.verdict["read"]
        return read

    @property
    def opened(self) -> bool:
        """The store opened for writing (False also when the read pass died before saying)."""
        return self._read.get("opened") is True

    @property
    def check_failures(self) -> list[str]:
        """What the checks found (counts by check, a few problems) or how they failed, on the
        store as the cut left it (``check``) and after the reopen (``check_after``)."""
        found: list[str] = []
        for phase in ("check", "check_after"):
            result = self.verdict[phase]
            if "error" in result:
                stderr = result.get("stderr", "").strip().splitlines()[-3:]
                found.append(f"{phase} failed: {result['error']}")
                found += [f"  | {line}" for line in stderr]
            problems: list[str] = result.get("problems", [])
            if problems:
                names = Counter(problem.split(":", 1)[0] for problem in problems)
                found.append(f"{phase}: {len(problems)} problems ({dict(names)})")
                found += [f"  {problem}" for problem in problems[:_SHOWN_PROBLEMS]]
        return found

    @property
    def clean(self) -> bool:
        return not self.check_failures

    def count(self, kind: str) -> int:
        """Pages of ``kind`` the read pass counted: good, post_flush, older, other_page,
        unrecognised, unreadable (0 if the store did not open)."""
        value: int = self._read.get(kind, 0)
        return value

    @property
    def pages_checked(self) -> int:
        return self.count("pages") if self.opened else 0

    @property
    def bad_pages(self) -> int:
        return sum(self.count(k) for k in ("older", "other_page", "unrecognised", "unreadable"))

    @property
    def failures(self) -> list[str]:
        """Why the store broke its promise in this cycle; empty if it kept it."""
        read = self._read
        found: list[str] = []
        if "opened" not in read:  # the read pass raised or died: opened or not, it is a failure
            found.append(f"the read pass failed: {read.get('error')}")
            found += [f"  | {line}" for line in read.get("stderr", "").strip().splitlines()[-3:]]
        elif not self.opened:
            found.append(f"the store did not open: {read.get('error')}")
        found += self.check_failures
        if self.bad_pages:
            found.append(
                f"{self.bad_pages} bad pages: {self.count('older')} older data, "
                f"{self.count('other_page')} another page's data, "
                f"{self.count('unrecognised')} unrecognised, {self.count('unreadable')} unreadable"
            )
            for kind, shown in read.get("examples", {}).items():
                found += [f"  {kind}: {json.dumps(entry)}" for entry in shown]
        return found

    @property
    def inconclusive(self) -> bool:
        """Passed, but no page read as written after the last flush: nothing written after it
        was seen on the disk, so the cut could not have shown the failure under test."""
        return not self.failures and self.count("post_flush") == 0

    def summary(self) -> str:
        verdict = "FAILED" if self.failures else "inconclusive" if self.inconclusive else "ok"
        flushed_at = self.verdict.get("last_flush_seconds")
        since = "" if flushed_at is None else f" {self.kill_delay - flushed_at:.1f} s before"
        return (
            f"seed {self.seed}: cut {self.kill_delay:.1f} s in, last flush{since} at op "
            f"{self.verdict['last_flush']} ({self.verdict['flushes']} flushes), opened "
            f"{'yes' if self.opened else 'no'}, clean {'yes' if self.clean else 'no'}, "
            f"{self.pages_checked} pages, {self.bad_pages} bad, "
            f"{self.count('post_flush')} post-flush: {verdict} "
            f"(boots of {self.write_seconds:.0f} + {self.verify_seconds:.0f} s)"
        )


def kill_delay(seed: int) -> float:
    """When the cut comes, in seconds after the writer's marker. A hash, not ``Random(seed)``:
    the first draws of neighbouring seeds (a test's cycles) are close to each other there."""
    fraction = int.from_bytes(hashlib.sha256(f"power cut {seed}".encode()).digest()[:8]) / 2**64
    low, high = KILL_WINDOW
    return low + (high - low) * fraction


def run_cycle(
    harness: Harness,
    seed: int,
    work_dir: Path,
    *,
    writeback: str = "aggressive",
    backend: str = "inside",
    size_mb: int = 16,
) -> Cycle:
    """Write, cut, verify (see the module docstring). ``work_dir`` (new) keeps the disk image
    and the log, to look at a failure again."""
    work_dir.mkdir(parents=True)
    image = work_dir / "scratch.img"
    export = work_dir / "export"
    export.mkdir()
    make_scratch_image(image, IMAGE_MB)
    python = shlex.quote(str(harness.repo_root / ".venv" / "bin" / "python"))
    guest = shlex.quote(str(GUEST))
    delay = kill_delay(seed)
    wrote = harness.run(
        f"{python} {guest} write --log {LOG} --seed {seed} --size-mb {size_mb} "
        f"--backend {backend} --writeback {writeback}",
        timeout=delay + _BOOT_ALLOWANCE,
        scratch_image=image,
        export=export,
        kill_after=(MARKER, delay),
    )
    (work_dir / "write.out").write_text(wrote.output)
    if not wrote.killed:
        raise CycleError(
            f"seed {seed}: the writer stopped (exit {wrote.returncode}) before the cut:\n"
            f"{wrote.output[-3000:]}"
        )
    verified = harness.run(
        f"{python} {guest} verify --log {LOG}",
        timeout=_VERIFY_TIMEOUT,
        scratch_image=image,
        export=export,
    )
    (work_dir / "verify.out").write_text(verified.output)
    lines = [line for line in verified.output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise CycleError(
            f"seed {seed}: the verifier printed no result (exit {verified.returncode}):\n"
            f"{verified.output[-3000:]}"
        )
    verdict: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    if "log_error" in verdict:
        raise CycleError(f"seed {seed}: {verdict['log_error']}")
    return Cycle(
        seed=seed,
        kill_delay=delay,
        verdict=verdict,
        write_output=wrote.output,
        verify_output=verified.output,
        write_seconds=wrote.elapsed,
        verify_seconds=verified.elapsed,
    )
