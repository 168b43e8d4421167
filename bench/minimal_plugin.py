"""The floor for a Python nbdkit plugin: a RAM disk that only copies bytes (PARALLEL).

    nbdkit python bench/minimal_plugin.py size=256M

bench/nbd_bench.py compares dedupblk's plugin with this: whatever dedupblk costs above it is
hashing, the store's bookkeeping and LMDB, not nbdkit's Python glue. The callbacks are bound
methods of one instance, as in dedupblk's plugin, so both pay the same call overhead.
"""

import nbdkit

API_VERSION = 2


class RamDisk:
    def __init__(self) -> None:
        self.disk = bytearray()

    def config(self, key: str, value: str) -> None:
        if key != "size":
            raise ValueError(f"unknown parameter {key}=")
        self.disk = bytearray(nbdkit.parse_size(value))

    def thread_model(self) -> int:
        return nbdkit.THREAD_MODEL_PARALLEL

    def open(self, readonly: bool) -> int:
        return 1

    def get_size(self, h: int) -> int:
        return len(self.disk)

    def can_multi_conn(self, h: int) -> bool:
        return True

    def pread(self, h: int, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.disk[offset : offset + len(buf)]

    def pwrite(self, h: int, buf: memoryview, offset: int, flags: int) -> None:
        self.disk[offset : offset + len(buf)] = buf

    def flush(self, h: int, flags: int) -> None:
        pass


_disk = RamDisk()
config = _disk.config
thread_model = _disk.thread_model
open = _disk.open
get_size = _disk.get_size
can_multi_conn = _disk.can_multi_conn
pread = _disk.pread
pwrite = _disk.pwrite
flush = _disk.flush
