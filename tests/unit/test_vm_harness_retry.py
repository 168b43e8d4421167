"""The VM harness boots again only when the guest kernel died before the command started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import vm as harness
from testbed.vm import Harness, VMError

_PANIC = "[    1.811765] Kernel panic - not syncing: Fatal exception in interrupt"
_STARTED = "vm-init: job starting at uptime 4.20"


def _boot(console: str, status: str = "") -> harness._Boot:
    started = harness._BOOT_MARKER.search(console)
    return harness._Boot(
        status=status,
        output="out\n",
        console=console,
        elapsed=1.0,
        boot_seconds=float(started.group(1)) if started else None,
        qemu_exit=0,
    )


def _harness(monkeypatch: pytest.MonkeyPatch, boots: list[harness._Boot]) -> list[int]:
    """A Harness whose boots return ``boots`` in turn; the returned list counts the boots."""
    calls: list[int] = []
    queue: Iterator[harness._Boot] = iter(boots)

    def fake_boot(self: Harness, *args: object) -> harness._Boot:
        calls.append(1)
        return next(queue)

    monkeypatch.setattr(Harness, "_boot", fake_boot)
    return calls


def _make() -> Harness:
    return Harness(kernel=None, initramfs=Path("/nonexistent"))  # type: ignore[arg-type]


def test_a_panic_before_the_command_boots_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _harness(monkeypatch, [_boot(f"boot\n{_PANIC}\n"), _boot(f"{_STARTED}\n", "0")])
    result = _make().run("true")
    assert len(calls) == 2
    assert result.returncode == 0
    assert result.failed_boots == (_PANIC,)
    assert result.boot_seconds == pytest.approx(4.2)


def test_a_second_panic_before_the_command_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _harness(monkeypatch, [_boot(_PANIC), _boot(_PANIC), _boot(_STARTED, "0")])
    with pytest.raises(VMError, match="panicked"):
        _make().run("true")
    assert len(calls) == 1 + harness._BOOT_RETRIES


def test_a_panic_after_the_command_started_is_never_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _harness(monkeypatch, [_boot(f"{_STARTED}\n{_PANIC}\n"), _boot(_STARTED, "0")])
    with pytest.raises(VMError, match="panicked"):
        _make().run("true")
    assert len(calls) == 1


def test_no_status_without_a_panic_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _harness(monkeypatch, [_boot("vm-init: FATAL: cannot mount /scratch\n")])
    with pytest.raises(VMError, match="without reporting"):
        _make().run("true")
    assert len(calls) == 1
