"""The fixes' mutants (`testbed/fail_without_fix.py`) stay current: each patch still takes its
fix out of this tree and names tests that exist, so the runner can show again that each test
fails without its fix. Running them all takes minutes; that is the runner's job, not CI's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.fail_without_fix import MUTANTS, Mutant
from tests.conftest import REPO

PATCHES = sorted(MUTANTS.glob("*.patch"))


def test_there_are_mutants() -> None:
    assert len(PATCHES) >= 40


@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_the_mutant_applies_and_names_existing_tests(patch: Path) -> None:
    mutant = Mutant.read(patch)
    applied = subprocess.run(["git", "-C", str(REPO), "apply", "--check", str(mutant.patch)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (REPO / path).is_file(), test
        function = name.split("[", 1)[0]
        assert f"def {function}(" in (REPO / path).read_text(), test
