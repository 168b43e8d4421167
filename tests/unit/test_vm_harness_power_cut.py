"""The VM harness's power-cut pieces without a VM: a kept scratch image, the /export share, and
SIGKILL of qemu once a marker appeared in the command's output (qemu replaced by a fake that
plays the guest's side of the share); and what `testbed.power_cut` makes of a cycle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed import vm as harness
from testbed.power_cut import Cycle, CycleError, run_cycle
from testbed.vm import Harness, KernelImage, VMError, VMResult, make_scratch_image
from tests.vm.guest.power_cut import RESULT_PREFIX

# Plays a guest: announces the job, counts its boots in the last 8 bytes of the disk image
# (/dev/vda), records its job.conf in /export, prints "started", then hangs if the command says
# so, else reports status 0.
FAKE_QEMU = r"""
import sys, time
from pathlib import Path
argv = sys.argv[1:]
shares = {}
for i, arg in enumerate(argv):
    if arg == "-virtfs":
        fields = dict(f.split("=", 1) for f in argv[i + 1].split(",")[1:] if "=" in f)
        shares[fields["mount_tag"]] = Path(fields["path"])
    if arg == "-drive":
        image = Path(argv[i + 1].split(",")[0].removeprefix("file="))
out = shares["vmout"]
print("vm-init: job starting at uptime 1.00", flush=True)
with image.open("r+b") as disk:
    disk.seek(-8, 2)
    boots = int.from_bytes(disk.read(8), "little") + 1
    disk.seek(-8, 2)
    disk.write(boots.to_bytes(8, "little"))
(shares["export"] / f"boot-{boots}").write_text((out / "job.conf").read_text())
with (out / "output").open("a") as output:
    output.write("sta")
    output.flush()
    output.write("rted\n")
if "hang" in (out / "job.sh").read_text():
    time.sleep(120)
(out / "status").write_text("0\n")
"""


@pytest.fixture
def fake_vm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Harness:
    fake = tmp_path / "fake_qemu.py"
    fake.write_text(FAKE_QEMU)
    real_argv = Harness.qemu_argv

    def qemu_argv(self: Harness, *args: object, **kwargs: object) -> list[str]:
        return [sys.executable, str(fake), *real_argv(self, *args, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr(Harness, "qemu_argv", qemu_argv)
    return Harness(kernel=KernelImage(release="6.12.0", root=Path("/k")), initramfs=Path("/i"))


def test_a_kept_image_an_export_and_a_kill_after_the_marker(
    fake_vm: Harness, tmp_path: Path
) -> None:
    image, export = tmp_path / "disk.img", tmp_path / "export"
    export.mkdir()
    make_scratch_image(image, 8)
    killed = fake_vm.run("hang", scratch_image=image, export=export, kill_after=("started", 0))
    assert killed.killed
    assert killed.returncode == -9
    assert killed.output == "started\n"
    assert (export / "boot-1").read_text() == "VM_SCRATCH=1\nVM_EXPORT=1\n"

    # The same image again: the first boot's write is there (the image was neither replaced
    # nor deleted), and a command that finishes before the kill is due reports its status.
    finished = fake_vm.run("true", scratch_image=image, export=export, kill_after=("never", 0))
    assert not finished.killed
    assert finished.returncode == 0
    assert (export / "boot-2").is_file()
    assert image.stat().st_size == 8 << 20


def test_a_command_that_finishes_is_not_killed(fake_vm: Harness, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    image = tmp_path / "disk.img"
    make_scratch_image(image, 8)
    # The marker shows up, but the status is reported before the (long) delay runs out.
    result = fake_vm.run("true", scratch_image=image, export=export, kill_after=("started", 60))
    assert not result.killed
    assert result.returncode == 0


def test_the_export_is_a_writable_share_tagged_export() -> None:
    vm = Harness(kernel=KernelImage(release="6.12.0", root=Path("/k")), initramfs=Path("/i"))
    argv = vm.qemu_argv(Path("/share"), None, 768, export=Path("/host/out"))
    shares = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-virtfs"]
    export = [s for s in shares if "mount_tag=export" in s]
    assert len(export) == 1
    assert export[0].startswith("local,path=/host/out,")
    assert "readonly" not in export[0]
    assert all("mount_tag=export" not in s for s in vm.qemu_argv(Path("/share"), None, 768))


def test_a_missing_image_or_export_is_refused(tmp_path: Path) -> None:
    vm = Harness(kernel=None, initramfs=Path("/nonexistent"))  # type: ignore[arg-type]
    with pytest.raises(VMError, match="is not a file"):
        vm.run("true", scratch_image=tmp_path / "absent.img")
    with pytest.raises(VMError, match="is not a directory"):
        vm.run("true", export=tmp_path / "absent")


def test_make_scratch_image_makes_a_sparse_ext4(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_scratch_image(image, 16)
    with image.open("rb") as disk:
        disk.seek(1024 + 0x38)  # the superblock's s_magic
        assert disk.read(2) == b"\x53\xef"
    assert image.stat().st_size == 16 << 20
    assert image.stat().st_blocks * 512 < 16 << 20


def test_the_marker_is_found_across_appends(tmp_path: Path) -> None:
    output = tmp_path / "output"
    watch = harness._KillAfterMarker(output, "power-cut: writing", 2.5)
    assert not watch.due(100.0)  # no output file yet
    output.write_text("booting\npower-cut: wri")
    assert not watch.due(101.0)
    with output.open("a") as more:
        more.write("ting\n")
    assert not watch.due(102.0)  # seen now: due 2.5 s later
    assert watch.kill_at == 104.5
    assert not watch.due(104.4)
    assert watch.due(104.5)


def test_wait_for_guest_kills_once_due(tmp_path: Path) -> None:
    (tmp_path / "output").write_text("started\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    kill = harness._KillAfterMarker(tmp_path / "output", "started", 0)
    outcome = harness._wait_for_guest(sleeper, tmp_path / "status", 60, kill)  # type: ignore[arg-type]
    assert outcome == harness._KILLED
    assert sleeper.returncode == -9


# -- testbed.power_cut: what a cycle's verdict means -----------------------------------------


def _verdict(read: dict[str, Any] | None = None, **phases: Any) -> dict[str, Any]:
    counts = dict.fromkeys(("post_flush", "older", "other_page", "unrecognised", "unreadable"), 0)
    return {
        "seed": 1,
        "flushes": 2,
        "last_flush": 10,
        "last_flush_seconds": 1.0,
        "window_end": 20,
        "check": {"problems": []},
        "check_after": {"problems": []},
        "read": {"opened": True, "pages": 8, "good": 8, **counts, "examples": {}, **(read or {})},
        **phases,
    }


def _cycle(verdict: dict[str, Any]) -> Cycle:
    return Cycle(1, 5.0, verdict, "", "", write_seconds=1.0, verify_seconds=1.0)


def test_a_clean_cycle_passes_and_is_conclusive_once_post_flush_data_was_seen() -> None:
    seen = _cycle(_verdict({"post_flush": 3}))
    assert seen.failures == []
    assert not seen.inconclusive
    assert "ok" in seen.summary()
    unseen = _cycle(_verdict())
    assert unseen.failures == []
    assert unseen.inconclusive


@pytest.mark.parametrize(
    "verdict",
    [
        _verdict({"older": 1, "good": 7}),
        _verdict({"other_page": 1, "good": 7}),
        _verdict({"unrecognised": 1, "good": 7}),
        _verdict({"unreadable": 1, "good": 7}),
        _verdict(check={"problems": ["index: index entry 00: slot 3 holds other data"]}),
        _verdict(check_after={"error": "the process died of SIGABRT", "stderr": "IS_LEAF(mp)"}),
        _verdict({"opened": False, "error": "NotAStore: no format record"}),
        {**_verdict(), "read": {"error": "the process died of SIGSEGV"}},
    ],
    ids=[
        "older",
        "other-page",
        "unrecognised",
        "unreadable",
        "check",
        "check-died",
        "no-open",
        "read-died",
    ],
)
def test_each_broken_promise_fails_the_cycle(verdict: dict[str, Any]) -> None:
    cycle = _cycle(verdict)
    assert cycle.failures
    assert not cycle.inconclusive
    assert "FAILED" in cycle.summary()


class _ScriptedHarness:
    """Stands in for `Harness`: each run returns the next of ``results``."""

    def __init__(self, results: list[VMResult]) -> None:
        self.repo_root = Path("/repo")
        self._results = iter(results)

    def run(self, command: str, **options: Any) -> VMResult:
        return next(self._results)


def _result(output: str, *, killed: bool) -> VMResult:
    return VMResult(-9 if killed else 1, output, "", 1.0, 1.0, killed=killed)


def test_a_cycle_without_a_verdict_is_a_harness_error(tmp_path: Path) -> None:
    stopped = _ScriptedHarness([_result("Traceback: StoreFull", killed=False)])
    with pytest.raises(CycleError, match=r"stopped .* before the cut"):
        run_cycle(stopped, 7, tmp_path / "a")  # type: ignore[arg-type]
    silent = _ScriptedHarness([_result("", killed=True), _result("no result", killed=False)])
    with pytest.raises(CycleError, match="printed no result"):
        run_cycle(silent, 7, tmp_path / "b")  # type: ignore[arg-type]
    verdict = f"{RESULT_PREFIX}{json.dumps(_verdict({'post_flush': 1}))}\n"
    fine = _ScriptedHarness([_result("", killed=True), _result(verdict, killed=False)])
    assert run_cycle(fine, 7, tmp_path / "c").failures == []  # type: ignore[arg-type]
