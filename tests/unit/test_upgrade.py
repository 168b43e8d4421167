"""`dedupblk upgrade`: a version-1 store (written record by record, tests/unit/v1_store.py)
becomes version 2 in place, reads the same, passes `check`, and a kill at any moment leaves a
store that opens as version 1 or as version 2."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.errors import FormatError
from dedupblk.store import check_store, open_store
from dedupblk.store.format import FORMAT, META_NEW_DIR
from tests.conftest import REPO, rand_page
from tests.unit.v1_store import make_v1_store

P = 4096


def _pages(count: int, seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    hot = [rng.randbytes(P) for _ in range(8)]
    pages = {}
    for page in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            pages[page] = rng.choice(hot)
        elif kind == 1:
            pages[page] = bytes([rng.randrange(1, 256)]) * P
        elif kind == 2:
            pages[page] = bytes(P)
        else:
            pages[page] = rng.randbytes(P)
    return pages


def _version(path: str) -> int:
    """The format version in ``meta`` (raises if there is no complete environment there)."""
    env = lmdb.open(os.path.join(path, "meta"), readonly=True, lock=False, max_dbs=8)
    try:
        with env.begin(db=env.open_db(b"info", create=False)) as txn:
            return FORMAT.unpack(txn.get(b"format"))[1]
    finally:
        env.close()


def _reads_as(path: str, expected: dict[int, bytes]) -> None:
    with open_store(path, readonly=True) as store:
        for page, content in expected.items():
            assert store.read(page * P, P) == content, page


def test_a_v1_store_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    make_v1_store(path, 1 << 20, _pages(64, 1))
    with pytest.raises(FormatError, match=f"run `dedupblk upgrade {path}`"):
        open_store(path)
    result = CliRunner().invoke(main, ["stats", path])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "dedupblk upgrade" in result.stderr


@pytest.mark.parametrize("max_index_entries", [0, 16])
def test_upgrade_keeps_every_page_and_passes_check(tmp_path: Path, max_index_entries: int) -> None:
    path = str(tmp_path / "s")
    expected = make_v1_store(
        path, 1 << 20, _pages(200, 2), max_index_entries=max_index_entries, deferred=(250, 251)
    )
    result = CliRunner().invoke(main, ["upgrade", path])
    assert result.exit_code == 0, result.output
    assert "from format version 1 to 2" in result.stdout
    assert not os.path.exists(os.path.join(path, META_NEW_DIR))
    _reads_as(path, expected)
    assert check_store(path).problems == []
    with open_store(path) as store:  # and it works as a store: dedup against converted slots
        contents = list(expected.values())
        hot = next(c for c in contents if contents.count(c) > 3 and len(set(c)) > 1)
        before = store.statistics().stored_pages
        store.write(220 * P, hot)
        store.write(221 * P, rand_page(9))
        store.commit()
        assert store.statistics().stored_pages == before + 1
    assert check_store(path).problems == []
    again = CliRunner().invoke(main, ["upgrade", path])
    assert again.exit_code == 0 and "already has format version 2" in again.stdout


def test_upgrade_killed_at_any_moment_leaves_v1_or_v2(tmp_path: Path) -> None:
    """SIGKILL at each step the upgrade names on its log (as it starts building, as it is about
    to exchange, once exchanged) and at moments spread over the building: each time the store
    opens as version 2 with every page, or is still version 1 and upgrades."""
    source = str(tmp_path / "source")
    expected = make_v1_store(source, 256 << 20, _pages(40000, 3))
    command = [sys.executable, "-m", "dedupblk.cli", "-v", "upgrade"]
    kill_points = [("building", 0.0), ("building", 0.02), ("building", 0.05),
                   ("exchanging", 0.0), ("now version 2", 0.0)]  # fmt: skip
    outcomes = []
    for n, (marker, delay) in enumerate(kill_points):
        path = str(tmp_path / f"s{n}")
        shutil.copytree(source, path)
        with subprocess.Popen([*command, path], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) as upgrade:  # fmt: skip
            assert upgrade.stderr is not None
            for line in upgrade.stderr:
                if marker in line:
                    break
            time.sleep(delay)
            upgrade.send_signal(signal.SIGKILL)
        outcomes.append(_version(path))
        if outcomes[-1] == 1:
            assert CliRunner().invoke(main, ["upgrade", path]).exit_code == 0
        _reads_as(path, expected)
        assert check_store(path).problems == []
    assert outcomes[0] == 1 and outcomes[-1] == 2, outcomes  # both kinds were met
