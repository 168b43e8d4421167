"""The guest has what the ublk and swap tests rely on (one boot), and the harness's errors work."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from testbed.vm import Harness, VMTimeout, make_scratch_image

# Each check announces itself, so a failure (set -e: exit 1) names the last one announced.
_GUEST_CHECKS = r"""
set -eu
checking() { echo "checking $1"; }
checking kernel;   uname -r | sed 's/^/kernel /'
checking ublk;     test -c /dev/ublk-control
checking zram;     test -e /sys/block/zram0 || test -e /sys/class/zram-control
checking scratch;  awk '$2 == "/scratch" {print "scratch " $3}' /proc/mounts
                   echo data > /scratch/probe && test "$(cat /scratch/probe)" = data
checking python;   /usr/bin/python3 -c 'import sys; print("python", sys.version.split()[0])'
checking readonly; if touch /usr/.vm-probe 2>/dev/null; then exit 1; fi
checking tmp;      echo data > "$HOME/probe"
checking env;      test "$SMOKE_VALUE" = "a b'c\$d"; echo "ci ${CI-unset}"
checking cwd;      test -f pyproject.toml
echo "all checks passed"
exit 7
"""


def test_guest_environment(vm: Harness) -> None:
    started = time.monotonic()
    result = vm.run(_GUEST_CHECKS, env={"SMOKE_VALUE": "a b'c$d"}, timeout=300)
    elapsed = time.monotonic() - started
    context = f"output:\n{result.output}\nconsole:\n{result.console}"
    assert "all checks passed" in result.output, context
    assert result.returncode == 7, context  # a nonzero status comes back as is
    assert re.search(r"^kernel 6\.12\.", result.output, re.MULTILINE), context
    assert "scratch ext4" in result.output, context
    assert re.search(r"^python 3\.\d+", result.output, re.MULTILINE), context
    assert f"ci {os.environ.get('CI', 'unset')}" in result.output, context
    assert result.boot_seconds is not None, context
    print(f"boot {result.boot_seconds:.1f} s (guest uptime), run {elapsed:.1f} s (host)")


def test_timeout_kills_the_vm(vm: Harness) -> None:
    # Killed long before the kernel is up: no boot is paid for.
    with pytest.raises(VMTimeout, match=r"(?s)still running after 1 s, killed.*console \(tail\)"):
        vm.run("true", timeout=1, scratch_mb=0)


def test_a_command_that_outlives_its_timeout_gets_sysrq_dumps(vm: Harness) -> None:
    # The job has started (a hang of ours, not of the boot): the kernel is asked, through qemu's
    # monitor, for its blocked tasks, CPU backtraces and memory before qemu is killed.
    with pytest.raises(VMTimeout) as raised:
        vm.run("sleep 600", timeout=60, scratch_mb=0)  # boots in about 6 s
    message = str(raised.value)
    assert "after SysRq dumps" in message, message
    for header in ("sysrq: Show Blocked State", "sysrq: Show backtrace of all active CPUs",
                   "sysrq: Show Memory", "Mem-Info:"):  # fmt: skip
        assert header in message, message


# Boot 1 of a power cut, in small: one file synced, one still in the page cache (writeback and
# the journal commit held off for a minute), a line on the host's /export, then the kill.
_BEFORE_THE_CUT = r"""
set -eu
mount -o remount,commit=60 /scratch
echo 6000 > /proc/sys/vm/dirty_expire_centisecs
echo 6000 > /proc/sys/vm/dirty_writeback_centisecs
echo kept > /scratch/kept
sync
echo lost > /scratch/lost
echo logged > /export/log
echo "cut me now"
sleep 600
"""


def test_a_kill_keeps_what_reached_the_disk_and_the_export(vm: Harness, tmp_path: Path) -> None:
    image, export = tmp_path / "disk.img", tmp_path / "export"
    export.mkdir()
    make_scratch_image(image, 64)
    cut = vm.run(
        _BEFORE_THE_CUT,
        scratch_image=image,
        export=export,
        kill_after=("cut me now", 1),
        timeout=300,
    )
    assert cut.killed, cut.output
    assert cut.returncode == -9
    assert (export / "log").read_text() == "logged\n"
    after = vm.run(
        "cat /scratch/kept; test -e /scratch/lost || echo lost is gone; cat /export/log",
        scratch_image=image,
        export=export,
        timeout=300,
    )
    assert after.output == "kept\nlost is gone\nlogged\n", after.output
    assert not after.killed
