"""The block-device conformance suite over NBD: libnbd against the plugin, one fresh store each.

Alignment checks are off in libnbd so that the suite's 512-byte writes reach the server as they
are (nbdkit 1.32 does not enforce the advertised 4 KiB minimum; the store does the
read-modify-write).
"""

from __future__ import annotations

from collections.abc import Callable

import nbd
import pytest

from dedupblk.device import BlockDevice, Extent
from tests.conformance import CHECKS, MIN_SIZE

from .nbd_helpers import ServerFactory, assert_clean

pytestmark = pytest.mark.nbd


class NbdDevice:
    """An NBD connection as a `BlockDevice`."""

    def __init__(self, uri: str) -> None:
        self.h = nbd.NBD()
        self.h.set_strict_mode(self.h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        self.h.connect_uri(uri)
        self.size = self.h.get_size()

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self.h.pwrite(bytes(data), offset, nbd.CMD_FLAG_FUA if fua else 0)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.h.trim(length, offset, nbd.CMD_FLAG_FUA if fua else 0)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.h.zero(length, offset, nbd.CMD_FLAG_FUA if fua else 0)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [(offset, length, False)]

    def commit(self) -> None:
        self.h.flush()

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
