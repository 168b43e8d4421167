"""Fixtures for the tests that boot a VM; every test under tests/vm is marked ``vm``.

The ``vm`` fixture fetches the kernel and builds the initramfs once per session (see
testbed/vm.py); each ``vm.run(command)`` then boots a fresh guest (about 5 s under TCG).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from testbed.vm import QEMU, Harness

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selection reads the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm() -> Harness:
    """The prepared harness. Without qemu: a failure in CI, a skip (with the reason) elsewhere."""
    if shutil.which(QEMU) is None and not os.environ.get("CI"):
        pytest.skip(f"{QEMU} not installed (make setup installs qemu-system-x86)")
    return Harness.prepare()
