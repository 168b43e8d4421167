"""qemu-io, qemu-img and nbdcopy against the plugin: unaligned I/O, zeroing, discard, FUA, AIO,
and whole-image copies in and out."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from .nbd_helpers import PAGE_SIZE, ServerFactory, assert_clean, run, statistics

pytestmark = pytest.mark.nbd

# Writes at unaligned offsets and lengths; later ones punch into earlier ones.
WRITES = [
    "write -P 0x11 1000 5000",
    "write -P 0x99 2000 1000",  # overwrite inside the first
    "write -P 0x22 7777 12345",
    "write -P 0x33 32768 65536",
    "write -z 40000 10000",  # unaligned zeroing: partial pages rewritten
    "write -P 0x44 131072 65536",
    "write -z -u 135168 16384",  # aligned zeroing that may trim
    "write -P 0x55 262144 65536",
    "discard 266240 8192",
    "write -f -P 0x66 400000 3000",  # FUA
    "aio_write -P 0x77 500000 4096",
    "aio_write -P 0x78 520000 10000",
    "aio_flush",
]
# What every byte of the first 640 KiB must read back as: (pattern, offset, length).
EXPECTED = [
    (0x00, 0, 1000),
    (0x11, 1000, 1000),
    (0x99, 2000, 1000),
    (0x11, 3000, 3000),
    (0x00, 6000, 1777),
    (0x22, 7777, 12345),
    (0x00, 20122, 32768 - 20122),
    (0x33, 32768, 40000 - 32768),
    (0x00, 40000, 10000),
    (0x33, 50000, 98304 - 50000),
    (0x00, 98304, 131072 - 98304),
    (0x44, 131072, 4096),
    (0x00, 135168, 16384),
    (0x44, 151552, 196608 - 151552),
    (0x00, 196608, 262144 - 196608),
    (0x55, 262144, 4096),
    (0x00, 266240, 8192),
    (0x55, 274432, 327680 - 274432),
    (0x00, 327680, 400000 - 327680),
    (0x66, 400000, 3000),
    (0x00, 403000, 500000 - 403000),
    (0x77, 500000, 4096),
    (0x00, 504096, 520000 - 504096),
    (0x78, 520000, 10000),
    (0x00, 530000, 655360 - 530000),
]


def qemu_io(uri: str, commands: list[str]) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", "-t", "writeback", uri]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def checks() -> list[str]:
    return [f"read -P {pattern:#04x} {offset} {length}" for pattern, offset, length in EXPECTED]


def test_expected_regions_tile_the_range() -> None:
    position = 0
    for _pattern, offset, length in EXPECTED:
        assert offset == position
        assert length > 0
        position += length


def test_qemu_io_unaligned_writes_zeroes_discards_fua_and_aio(nbd_server: ServerFactory) -> None:
    server = nbd_server()
    written = qemu_io(server.uri, WRITES)
    assert written.returncode == 0, written.stdout + written.stderr
    read = qemu_io(server.uri, checks())
    assert read.returncode == 0, read.stdout
    assert "verification failed" not in read.stdout
    server.restart()  # all of it was flushed (aio_flush; the rest at disconnect and cleanup)
    reread = qemu_io(server.uri, checks())
    assert reread.returncode == 0, reread.stdout
    assert "verification failed" not in reread.stdout
    # The control: a wrong pattern is reported, so the checks above can fail.
    wrong = qemu_io(server.uri, ["read -P 0x12 1000 1000"])
    assert "verification failed" in wrong.stdout
    assert server.stop() == 0
    assert_clean(server.store)


def make_image(path: Path, pages: int) -> tuple[int, int, int]:
    """A raw image of duplicates, zeros, same-filled and unique random pages.

    Returns the (data pages, distinct data pages, same-filled pages) it holds.
    """
    rng = random.Random(7)
    common = [rng.randbytes(PAGE_SIZE) for _ in range(8)]
    layout: list[bytes] = []
    quarter = pages // 4
    layout += [common[i % len(common)] for i in range(quarter)]  # duplicates
    layout += [bytes(PAGE_SIZE)] * quarter  # zeros
    layout += [bytes([0xA5]) * PAGE_SIZE] * (quarter // 2)  # same-filled
    layout += [(i + 1).to_bytes(8, "little") * (PAGE_SIZE // 8) for i in range(quarter // 2)]
    unique = pages - len(layout)
    layout += [rng.randbytes(PAGE_SIZE) for _ in range(unique)]  # unique random
    path.write_bytes(b"".join(layout))
    return quarter + unique, len(common) + unique, quarter


def test_qemu_img_convert_compare_and_nbdcopy_back(
    nbd_server: ServerFactory, tmp_path: Path
) -> None:
    size = 16 << 20
    server = nbd_server(size)
    image = tmp_path / "image.raw"
    data_pages, distinct, same_filled = make_image(image, size // PAGE_SIZE)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri)
    copy = tmp_path / "copy.raw"
    run("nbdcopy", server.uri, str(copy))
    assert copy.read_bytes() == image.read_bytes()
    assert server.stop() == 0
    assert_clean(server.store)
    stats = statistics(server.store)
    assert (stats.mapped_pages, stats.stored_pages, stats.same_filled_pages) == (
        data_pages,
        distinct,
        same_filled,
    )
