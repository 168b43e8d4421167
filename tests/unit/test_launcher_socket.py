"""`serve --frontend nbd` makes nbdkit's socket private without following a symlink: one planted
in the socket's place between nbdkit's bind and the chmod must not make its target 0600 (nor,
as root, give the planter a way to change modes of files it cannot touch)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dedupblk.errors import NbdError
from dedupblk.nbd.launcher import _make_private


def test_a_symlink_in_the_sockets_place_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "someone-elses-file"
    target.write_text("kept\n")
    target.chmod(0o644)
    socket = tmp_path / "nbd.sock"
    socket.symlink_to(target)
    server = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(NbdError, match="was replaced while nbdkit started"):
            _make_private(server, str(socket))
        assert server.poll() is not None  # the server it started is stopped
    finally:
        server.kill()
        server.wait()
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.path.islink(socket)
