"""Errors over the wire and at start-up: ENOSPC from a full store, EPERM from a read-only export,
one-line parameter errors, and a server that keeps serving after a failed request."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import nbd
import pytest

from dedupblk.store import create_store

from .nbd_helpers import PAGE_SIZE, PLUGIN, ServerFactory, assert_clean, statistics

pytestmark = pytest.mark.nbd

BACKEND_SLOTS = 8  # the backend holds the header slot and seven data slots


def unique_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def test_full_store_gives_enospc_and_keeps_serving(nbd_server: ServerFactory) -> None:
    server = nbd_server(1 << 20, backend_size=BACKEND_SLOTS * PAGE_SIZE)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    written = 0
    failure: nbd.Error | None = None
    for page in range(64):
        try:
            h.pwrite(unique_page(page), page * PAGE_SIZE)
        except nbd.Error as exc:
            failure = exc
            break
        written += 1
    assert failure is not None
    assert failure.errnum == errno.ENOSPC
    assert 0 < written < BACKEND_SLOTS
    # Still serving on the same connection: reads, duplicates, zeros and same-filled pages need no
    # new slot; a trim frees one for new data after the flush.
    for page in range(written):
        assert h.pread(PAGE_SIZE, page * PAGE_SIZE) == unique_page(page)
    h.pwrite(unique_page(0), 100 * PAGE_SIZE)
    h.pwrite(b"\x33" * PAGE_SIZE, 101 * PAGE_SIZE)
    h.zero(PAGE_SIZE, 102 * PAGE_SIZE)
    with pytest.raises(nbd.Error) as again:
        h.pwrite(unique_page(1000), 103 * PAGE_SIZE)
    assert again.value.errnum == errno.ENOSPC
    h.trim(PAGE_SIZE, 1 * PAGE_SIZE)
    h.flush()
    h.pwrite(unique_page(1000), 103 * PAGE_SIZE)
    assert h.pread(PAGE_SIZE, 103 * PAGE_SIZE) == unique_page(1000)
    h.flush()
    h.shutdown()
    # A new connection works too.
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.pread(PAGE_SIZE, 100 * PAGE_SIZE) == unique_page(0)
    h.shutdown()
    assert server.stop() == 0
    assert_clean(server.store)
    stats = statistics(server.store)
    assert stats.stored_pages == written  # page 1's slot went to the new content
    assert stats.same_filled_pages == 1


def test_readonly_export_refuses_writes_with_eperm(nbd_server: ServerFactory) -> None:
    server = nbd_server(1 << 20)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"\x42" * PAGE_SIZE + unique_page(1), 0)
    h.shutdown()
    server.stop()
    server.params = ["readonly=true"]
    server.start()
    h = nbd.NBD()
    h.connect_uri(server.uri)
    with pytest.raises(nbd.Error) as refused:  # libnbd's own check of the export's flags
        h.pwrite(unique_page(2), 0)
    assert refused.value.errnum == errno.EPERM
    h.set_strict_mode(0)  # send them anyway: the server's answer is checked below
    for attempt in (
        lambda: h.pwrite(unique_page(2), 0),
        lambda: h.zero(PAGE_SIZE, 0),
        lambda: h.trim(PAGE_SIZE, 0),
    ):
        with pytest.raises(nbd.Error) as failure:
            attempt()
        assert failure.value.errnum == errno.EPERM
    assert h.pread(2 * PAGE_SIZE, 0) == b"\x42" * PAGE_SIZE + unique_page(1)
    h.shutdown()
    assert server.stop() == 0


def test_readonly_export_accepts_flush(nbd_server: ServerFactory) -> None:
    # nbdkit passes FLUSH on a read-only export to the plugin (only writes are refused), and
    # a client may send one: it succeeds, with nothing to make durable.
    server = nbd_server(1 << 20, params=["readonly=true"], nbdkit_args=["--readonly"])
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.is_read_only() and h.can_flush()
    h.flush()
    assert h.pread(PAGE_SIZE, 0) == bytes(PAGE_SIZE)
    h.shutdown()
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def test_requests_outside_the_device_fail_and_the_export_keeps_serving(
    nbd_server: ServerFactory,
) -> None:
    server = nbd_server(1 << 20)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    # libnbd refuses out-of-range requests itself unless told not to check.
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as failure:
        h.pwrite(unique_page(3), (1 << 20) - 100)
    assert failure.value.errnum in (errno.ENOSPC, errno.EINVAL)
    h.pwrite(unique_page(3), 0)
    assert h.pread(PAGE_SIZE, 0) == unique_page(3)
    h.shutdown()


def nbdkit_once(*params: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        ["nbdkit", "-U", "-", "python", str(PLUGIN), *params, "--run", "nbdinfo --size $uri"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=cwd,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ((), "store=PATH is required"),
        (("store={tmp}/missing",), "no such store (size=SIZE creates it)"),
        (("store={tmp}/s", "colour=blue"), "unknown parameter colour="),
        (("store={tmp}/s", "size=12 parsecs"), "size=12 parsecs: not a size"),
        (("store={tmp}/s", "size=4097"), "size=4097: must be a positive multiple of 4096"),
        (("store={tmp}/s", "readonly=perhaps"), "readonly=perhaps: not a boolean"),
        (("store={tmp}/s", "max-share=7"), "max-share= only applies when size= creates"),
        (("store={tmp}/s", "store={tmp}/t"), "store= given twice"),
        (("store={tmp}/s", "size=1M", "max-share=0"), "bad max-share 0"),
        (("store={tmp}/existing", "size=2M"), "already exists with size 1048576"),
        (("store={tmp}/new", "size=1e"), "more than 4294967294 slots"),
    ],
)
def test_bad_parameters_stop_nbdkit_with_one_line(
    tmp_path: Path, params: tuple[str, ...], message: str
) -> None:
    create_store(tmp_path / "existing", 1 << 20)
    result = nbdkit_once(*(p.format(tmp=tmp_path) for p in params))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("nbdkit: dedupblk: error: ")
    assert message in result.stderr


def test_locked_store_is_a_one_line_error(nbd_server: ServerFactory) -> None:
    server = nbd_server(1 << 20)
    result = nbdkit_once(f"store={server.store}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "in use by another process" in result.stderr


def test_size_creates_the_store_from_any_directory_with_a_relative_path(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    result = nbdkit_once("store=new-store", "size=2M", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(2 << 20)
    assert statistics(tmp_path / "elsewhere" / "new-store").size_bytes == 2 << 20
    again = nbdkit_once("store=new-store", "size=2M", cwd=tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr
