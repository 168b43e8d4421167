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


def _unit_guard() -> str:
    """The unit's first ExecStartPre: the shell that refuses an unsafe SLOTS (its continuation
    lines joined as systemd joins them, the specifiers of instance `swap` put in)."""
    text = (REPO / "contrib" / UNIT).read_text()
    lines = iter(text[text.index("\nExecStartPre=") + 1 :].splitlines())
    command = next(lines).removeprefix("ExecStartPre=")
    while command.endswith("\\"):
        command = command[:-1] + " " + next(lines)
    assert command.startswith("/bin/sh -c '") and command.endswith("'")
    script = command[len("/bin/sh -c '") : -1]
    return script.replace("%i", "swap").replace("%n", "dedupblk-swap@swap.service")


def test_the_unit_defaults_to_the_safe_swap_placement(tmp_path: Path) -> None:
    # Metadata on the ramfs at /run/dedupblk, slots a block device that must be named, and a
    # slot file only with the risk accepted in words (docs/swap.md: files hung the machine).
    text = (REPO / "contrib" / UNIT).read_text()
    (line,) = re.findall(r"^Environment=STORE=.*$", text, re.MULTILINE)
    defaults = dict(word.split("=", 1) for word in line.removeprefix("Environment=").split())
    assert defaults["STORE"] == "/run/dedupblk/%i"
    assert defaults["SLOTS"] == "" and defaults["SERVE_OPTIONS"] == ""
    assert "mount -t ramfs -o mode=700 ramfs /run/dedupblk" in text
    guard = _unit_guard()
    slot_file = tmp_path / "swap.slots"
    slot_file.write_bytes(b"")

    def run(slots: str, options: str = "") -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SLOTS=slots, SERVE_OPTIONS=options)
        return subprocess.run(["/bin/sh", "-c", guard], env=env, capture_output=True, text=True,
                              check=False)  # fmt: skip

    assert run("").returncode == 1 and "set SLOTS" in run("").stderr
    refused = run(str(slot_file))
    assert refused.returncode == 1 and "is not a block device" in refused.stderr
    assert run(str(slot_file), "--swap-placement-may-hang").returncode == 0
    blocks = [p for p in Path("/dev").iterdir() if p.is_block_device()]
    if blocks:
        assert run(str(blocks[0])).returncode == 0


def test_the_readme_runs_swap_on_the_safe_placement() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running as swap") :]
    commands = section[section.index("```sh\n") + 6 : section.index("```\n", 6)]
    assert "mount -t ramfs" in commands  # the metadata on ramfs
    (create,) = re.findall(r"^dedupblk create .*(?:\\\n.*)*", commands, re.MULTILINE)
    (backend,) = re.findall(r"--backend (\S+)", create)
    assert backend.startswith("/dev/")  # a block device of its own
    assert "--swap-placement-may-hang" not in commands
