"""The store is a pure core: importing it loads no frontend, click, nbdkit or io_uring code.

The kernel interface, ``dedupblk.ublk``, is a second core beside it: neither imports the other,
and each of its modules imports only those below it.
"""

from __future__ import annotations

import ast
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


def test_a_ublk_server_loads_prometheus_client_only_for_its_endpoint() -> None:
    """The ublk server runs in the CLI's process with its memory locked (`dedupblk.counters`)."""
    probe = (
        "import sys, dedupblk.cli, dedupblk.frontends.ublk, dedupblk.nbd.adapter;"
        "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'wsgiref'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# dedupblk/ublk's modules, lowest first (its __init__ docstring lists them the same way).
UBLK_FLOORS = ["abi", "uring", "hardening", "placement", "control", "queue", "server"]


def test_ublk_modules_import_only_lower_floors() -> None:
    package = REPO / "dedupblk" / "ublk"
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(["__init__", *UBLK_FLOORS])
    for floor, name in enumerate(UBLK_FLOORS):
        tree = ast.parse((package / f"{name}.py").read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        siblings = {node.module for node in imports if node.level == 1}
        outside = {node.module for node in imports if node.level == 2}
        absolute = {node.module for node in imports if node.level == 0}
        assert siblings <= set(UBLK_FLOORS[:floor]), (name, siblings)
        assert outside <= {"errors", "libc", "fsinfo"}, (name, outside)
        assert not any(str(module).startswith("dedupblk") for module in absolute), name


def test_ublk_and_the_store_do_not_import_each_other() -> None:
    ublk = "; ".join(f"import dedupblk.ublk.{m}" for m in UBLK_FLOORS)
    for load, forbidden in [
        (ublk, ("dedupblk.store", "dedupblk.frontends")),
        ("import dedupblk.store, dedupblk.store.check", ("dedupblk.ublk",)),
    ]:
        probe = f"import sys; {load}; bad = [m for m in sys.modules if m.startswith({forbidden})]; "
        probe += "print(bad); sys.exit(1 if bad else 0)"
        result = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
