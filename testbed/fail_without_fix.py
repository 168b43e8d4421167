"""Each fix's test, run without its fix: every ``testbed/mutants/*.patch`` undoes one fix.

    .venv/bin/python -m testbed.fail_without_fix            # every mutant
    .venv/bin/python -m testbed.fail_without_fix NAME ...   # some (file names without .patch)

A patch opens with lines that say what it undoes and which tests must notice::

    Point: the store's files are private (issue 12)
    Test: tests/unit/test_durability.py::test_store_files_are_private
    Why: without the umask the store's files are 0644

followed by the diff (``git diff`` of a tree with the fix taken out). For each, a worktree of HEAD
gets the patch and its tests run there (``PYTHONPATH`` makes the tests and every process they
start import that tree's dedupblk, not this checkout's); the mutant is *caught* when pytest
reports every named test failed (exit status 1), not when one passes, the tests could not be
collected or the patch does not apply. The tests themselves pass on HEAD (`make test` runs
them), and they are HEAD's: commit a new test before its mutant can be run. Prints one line per
mutant and exits 1 if any was not caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "testbed" / "mutants"
_TIMEOUT = 900.0  # seconds for one mutant's tests


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    point: str
    tests: tuple[str, ...]
    why: str
    patch: Path

    @classmethod
    def read(cls, patch: Path) -> Mutant:
        fields: dict[str, list[str]] = {"Point": [], "Test": [], "Why": []}
        for line in patch.read_text().splitlines():
            if line.startswith("diff --git"):
                break
            key, sep, value = line.partition(":")
            if sep and key in fields:
                fields[key].append(value.strip())
        if not fields["Test"] or not fields["Point"]:
            raise SystemExit(f"{patch}: needs a Point: and at least one Test: line")
        return cls(
            patch.stem, fields["Point"][0], tuple(fields["Test"]), " ".join(fields["Why"]), patch
        )


@dataclasses.dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    caught: bool
    detail: str
    seconds: float


def _own_venv(tree: Path) -> None:
    """A venv in ``tree`` as `make venv` makes one (the tree's dedupblk installed editable)."""
    venv = tree / ".venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)  # fmt: skip
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e",
                    f"{tree}[dev]"], check=True, capture_output=True)  # fmt: skip


def run(mutant: Mutant) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), "HEAD"],
            check=True,
        )
        try:
            applied = subprocess.run(
                ["git", "-C", str(tree), "apply", str(mutant.patch)],
                capture_output=True,
                text=True,
                check=False,
            )
            if applied.returncode:
                return Outcome(mutant, False, "patch does not apply: " + applied.stderr.strip(),
                               time.monotonic() - start)  # fmt: skip
            # The nbdkit plugin loads its packages from the tree's .venv: lend it this one's. A
            # VM guest gets no PYTHONPATH, and this venv's dedupblk is this checkout's: a VM
            # test needs a venv of the tree's own. The VM tier's kernel and initramfs
            # (.cache/vm) are fetched once, here.
            if any(test.startswith("tests/vm/") for test in mutant.tests):
                _own_venv(tree)
            else:
                (tree / ".venv").symlink_to(ROOT / ".venv")
            if (ROOT / ".cache").is_dir():
                (tree / ".cache").symlink_to(ROOT / ".cache")
            env = dict(os.environ, PYTHONPATH=str(tree), COLUMNS="250")
            python = str(tree / ".venv" / "bin" / "python")
            try:
                tests = subprocess.run(
                    [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     f"--basetemp={scratch}/pytest", *mutant.tests],
                    cwd=tree, env=env, capture_output=True, text=True, timeout=_TIMEOUT,
                    check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                return Outcome(mutant, False, f"the tests ran over {_TIMEOUT:.0f} s",
                               time.monotonic() - start)  # fmt: skip
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )
    lines = tests.stdout.strip().splitlines()
    # "FAILED <node id> - <message>": a parameter id may hold spaces, the message follows " - ".
    failed = [line[7:].split(" - ", 1)[0] for line in lines if line.startswith("FAILED ")]
    passed = [t for t in mutant.tests if not any(f.startswith(t) for f in failed)]
    caught = tests.returncode == 1 and not passed
    if tests.returncode in (4, 5):  # usage error, or nothing collected
        summary = "tests not found: " + (lines[-1] if lines else tests.stderr.strip())
    elif passed:
        summary = "passed without the fix: " + ", ".join(t.rsplit("::", 1)[-1] for t in passed)
    else:
        first = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        summary = first[0] if first else lines[-1] if lines else tests.stderr.strip()
    return Outcome(mutant, caught, summary[:200], time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    args = parser.parse_args()
    patches = sorted(MUTANTS.glob("*.patch"))
    if args.names:
        wanted = set(args.names)
        patches = [p for p in patches if p.stem in wanted]
        missing = wanted - {p.stem for p in patches}
        if missing:
            print(f"no such mutant: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    mutants = [Mutant.read(p) for p in patches]
    outcomes = []
    for mutant in mutants:
        outcome = run(mutant)
        outcomes.append(outcome)
        verdict = "caught" if outcome.caught else "NOT CAUGHT"
        print(f"{verdict:10} {mutant.name:40} {outcome.seconds:5.0f}s  {outcome.detail}",
              flush=True)  # fmt: skip
    caught = sum(o.caught for o in outcomes)
    print(f"{caught} of {len(outcomes)} mutants caught by their tests")
    print()
    print("| mutant | point | tests | without the fix |")
    print("|---|---|---|---|")
    for o in outcomes:
        tests = ", ".join(t.rsplit("::", 1)[-1] for t in o.mutant.tests)
        verdict = "fails" if o.caught else "**passes**"
        print(f"| `{o.mutant.name}` | {o.mutant.point} | `{tests}` | {verdict} |")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
