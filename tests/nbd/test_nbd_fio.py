"""fio's NBD engine against the plugin: verified random writes that survive a restart."""

from __future__ import annotations

import subprocess

import pytest

from .nbd_helpers import ServerFactory, assert_clean, run, statistics

pytestmark = pytest.mark.nbd

PAGES = 8192  # 32 MiB of 4 KiB blocks, each written once (fio's random map)


def fio_verify(uri: str, *extra: str) -> list[str]:
    return [
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}",
        "--rw=randwrite", "--bs=4k", f"--size={PAGES * 4096}", "--iodepth=16",
        "--randseed=20261127", "--verify=crc32c", "--verify_fatal=1", *extra,
    ]  # fmt: skip


def test_verified_random_writes_survive_a_restart(nbd_server: ServerFactory) -> None:
    server = nbd_server()
    run(*fio_verify(server.uri))  # writes, then reads back and verifies in the same job
    server.restart()
    run(*fio_verify(server.uri, "--verify_only"))
    assert server.stop() == 0
    assert_clean(server.store)
    # fio's verify header names each block's offset, so every page is distinct data.
    stats = statistics(server.store)
    assert (stats.mapped_pages, stats.stored_pages, stats.same_filled_pages) == (PAGES, PAGES, 0)


def test_verify_only_fails_on_data_that_was_never_written(nbd_server: ServerFactory) -> None:
    """The control for the test above: the same verify pass rejects an empty export."""
    server = nbd_server()
    result = subprocess.run(
        fio_verify(server.uri, "--verify_only"), capture_output=True, check=False
    )
    assert result.returncode != 0
