"""The adapter spells nbdkit's constants as literals (it cannot import `nbdkit` outside nbdkit):
check them against the `nbdkit` module of the installed nbdkit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dedupblk.nbd import adapter as nbdkit_adapter
from dedupblk.nbd import params as nbdkit_params

from .nbd_helpers import run

pytestmark = pytest.mark.nbd

DUMP_PLUGIN = """
import builtins
import nbdkit

API_VERSION = 2


def config(key, value):
    constants = {name: getattr(nbdkit, name) for name in dir(nbdkit) if name.isupper()}
    with builtins.open(value, "w") as out:
        out.write(repr(constants))


def open(readonly):
    return 1


def get_size(h):
    return 0


def pread(h, buf, offset, flags):
    pass
"""


def test_adapter_constants_match_nbdkit(tmp_path: Path) -> None:
    plugin = tmp_path / "dump.py"
    plugin.write_text(DUMP_PLUGIN)
    out = tmp_path / "constants"
    run("nbdkit", "-U", "-", "python", str(plugin), f"out={out}", "--run", "true")
    constants = ast.literal_eval(out.read_text())
    for name in ("FLAG_MAY_TRIM", "FLAG_FUA", "FLAG_REQ_ONE", "FLAG_FAST_ZERO", "FUA_NATIVE"):
        assert getattr(nbdkit_adapter, name) == constants[name], name
    for name in ("THREAD_MODEL_SERIALIZE_ALL_REQUESTS", "THREAD_MODEL_PARALLEL"):
        assert getattr(nbdkit_params, name) == constants[name], name
    assert constants["EXTENT_HOLE"] | constants["EXTENT_ZERO"] == nbdkit_adapter.EXTENT_HOLE_ZERO
