"""systemd's notify protocol as `dedupblk.sd_notify` speaks it, read from a datagram socket bound
here as systemd binds NOTIFY_SOCKET; and what the ublk frontend sends through it when its device
is ready and when it stops (`Announcement`, without a kernel)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupblk import sd_notify, served
from dedupblk.frontends.ublk import Announcement


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield listener


def test_assignments_go_as_one_datagram(systemd: socket.socket) -> None:
    assert sd_notify.notify("READY=1", "STATUS=serving /x as /dev/ublkb7")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=serving /x as /dev/ublkb7"
    assert sd_notify.notify("STOPPING=1")
    assert systemd.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dedupblk-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("READY=1")
        assert listener.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not sd_notify.notify("READY=1")


@pytest.mark.parametrize("address", ["/nonexistent/notify", "vsock:2:1234"])
def test_a_failed_send_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.WARNING):
        assert not sd_notify.notify("READY=1")
    assert "systemd not notified" in caplog.text or "cannot notify systemd" in caplog.text


def test_the_ublk_server_announces_ready_and_stopping(
    systemd: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served, "ROOT_REGISTRY", tmp_path / "served")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    store = str(tmp_path / "swap")
    announcement = Announcement(store)
    announcement.ready("/dev/ublkb7")  # what Server.run calls once it printed the path
    assert systemd.recv(4096) == f"READY=1\nSTATUS=serving {store} as /dev/ublkb7".encode()
    ((_, record),) = served.entries()
    assert (record.store, record.frontend, record.pid, record.device) == (
        store, "ublk", os.getpid(), "/dev/ublkb7",
    )  # fmt: skip
    announcement.stopping("/dev/ublkb7")  # on the stop signal, before swapoff
    assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=stopping /dev/ublkb7"
    announcement.close()  # once the device is deleted
    assert served.entries() == []
