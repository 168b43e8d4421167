"""contrib/dedupblk-swap@.service as `make install-systemd` installs it: no path left to fill in,
the venv's dedupblk named, and a unit `systemd-analyze verify` has nothing to say about."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = "dedupblk-swap@.service"


def install(unit_dir: Path) -> Path:
    """`make install-systemd` into ``unit_dir``: the installed unit."""
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "install-systemd", f"UNIT_DIR={unit_dir}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in unit_dir.iterdir()) == [UNIT]  # no temporary left
    return unit_dir / UNIT


def verify(unit: Path) -> str:
    """What `systemd-analyze verify` says about an instance of ``unit`` (the template beside
    it); it exits 0 on an unknown key or a bad value and only warns, so its output counts."""
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("CI has systemd-analyze: the unit must be verified")
        pytest.skip("needs systemd-analyze")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit.parent / "dedupblk-swap@swap.service")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return (f"exit {done.returncode}\n" if done.returncode else "") + done.stdout + done.stderr


def test_the_installed_unit_names_this_venv_and_verifies(tmp_path: Path) -> None:
    unit = install(tmp_path)
    text = unit.read_text()
    assert not re.search(r"@[A-Z]+@", text), "a placeholder is left"
    assert "/opt/dedupblk" not in text
    (dedupblk,) = re.findall(r"^Environment=DEDUPBLK=(\S+)$", text, re.MULTILINE)
    assert dedupblk == str(REPO / ".venv" / "bin" / "dedupblk")
    assert os.access(dedupblk, os.X_OK)
    assert f"Documentation=file://{REPO}/README.md" in text
    service = dict(
        line.split("=", 1) for line in text.split("[Service]")[1].split("[Install]")[0].splitlines()
        if re.match(r"^[A-Z]\w*=", line)
    )  # fmt: skip
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert service["StateDirectory"] == "dedupblk"
    assert "devices --has-device" in service["ExecStart"] and "grep" not in text
    assert verify(unit) == ""


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        (("\nType=notify\n", "\nTpye=notify\n"), "Unknown key"),
        (("\nType=notify\n", "\nType=notfy\n"), "Failed to parse service type"),
        (("\nExecStart=/bin/sh", "\nExecStart=/bin/nosh"), "is not executable"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, mistake: tuple[str, str], said: str) -> None:
    """The check above fails on a unit with a typo: systemd-analyze's words are heard."""
    unit = install(tmp_path)
    good, bad = mistake
    assert good in unit.read_text()
    unit.write_text(unit.read_text().replace(good, bad))
    assert said in verify(unit)
