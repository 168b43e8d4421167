"""The store is a pure core: importing it loads no frontend, click, nbdkit or io_uring code."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_store_imports_no_frontend() -> None:
    probe = (
        "import sys, dedupblk.store, dedupblk.store.check;"
        "bad = [m for m in sys.modules if m.startswith(('dedupblk.frontends', 'dedupblk.cli',"
        " 'click', 'nbdkit', 'nbd'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
