"""The block-device conformance suite over NBD: libnbd against the plugin, one fresh store each.

Alignment checks are off in libnbd so that the suite's 512-byte writes reach the server as they
are (nbdkit 1.32 does not enforce the advertised 4 KiB minimum; the store does the
read-modify-write).
"""

from __future__ import annotations

from collections.abc import Callable

import nbd
import pytest

from tests.conformance import CHECKS, MIN_SIZE, BlockDevice

from .nbd_helpers import ServerFactory, assert_clean

pytestmark = pytest.mark.nbd


class NbdDevice:
    def __init__(self, uri: str) -> None:
        self.h = nbd.NBD()
        self.h.set_strict_mode(self.h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        self.h.connect_uri(uri)
        self.size = self.h.get_size()

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def pwrite(self, offset: int, data: bytes) -> None:
        self.h.pwrite(data, offset)

    def trim(self, offset: int, length: int) -> None:
        self.h.trim(length, offset)

    def zero(self, offset: int, length: int) -> None:
        self.h.zero(length, offset)

    def flush(self) -> None:
        self.h.flush()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(nbd_server: ServerFactory, check: Callable[[BlockDevice], None]) -> None:
    server = nbd_server(MIN_SIZE)
    device = NbdDevice(server.uri)
    check(device)
    device.h.shutdown()
    assert server.stop() == 0
    assert_clean(server.store)
