"""`dedupblk estimate` of a real ext4 image against the `stats` of a store the image was then
copied into over NBD (`dedupblk serve --frontend nbd`, `qemu-img convert`), as a user would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fsimage import ext4_image

from .nbd_helpers import assert_clean, run

pytestmark = pytest.mark.nbd

DEDUPBLK = (sys.executable, "-m", "dedupblk.cli")


def dedupblk_json(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [*DEDUPBLK, *args, "--json"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    record: dict[str, object] = json.loads(done.stdout)
    return record


def test_estimate_agrees_with_a_store_filled_over_nbd(tmp_path: Path) -> None:
    image = ext4_image(tmp_path)
    predicted = dedupblk_json("estimate", str(image))
    store = tmp_path / "store"
    subprocess.run([*DEDUPBLK, "create", str(store), "--size", str(predicted["size_bytes"])],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    serve = [*DEDUPBLK, "serve", str(store), "--frontend", "nbd",
             "--socket", str(tmp_path / "nbd.sock"), "--foreground"]  # fmt: skip
    with subprocess.Popen(serve, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as server:  # fmt: skip
        try:
            assert server.stdout is not None
            uri = server.stdout.readline().strip()  # printed once nbdkit listens
            assert uri, server.communicate(timeout=60)[1]
            run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri)
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
    assert_clean(store)
    real = dedupblk_json("stats", str(store))
    for key in ("mapped_pages", "same_filled_pages", "zero_pages", "size_bytes"):
        assert predicted[key] == real[key], key
    stored, real_stored = predicted["stored_pages"], real["stored_pages"]
    assert isinstance(stored, int) and isinstance(real_stored, int)
    assert abs(stored - real_stored) <= real_stored / 100
    # qemu-img's requests commit in batches of their own: the high-water mark moves a little.
    metadata, real_metadata = predicted["metadata_bytes"], real["metadata_bytes"]
    assert isinstance(metadata, int) and isinstance(real_metadata, int)
    assert abs(metadata / real_metadata - 1) < 0.25, (metadata, real_metadata)
