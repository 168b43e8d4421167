"""The click CLI: commands, JSON shapes, exit codes and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.store import Statistics, open_store
from tests.conftest import rand_page

P = 4096
STATS_KEYS = {field.name for field in dataclasses.fields(Statistics)}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_create_info_stats_check(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    code, out, _ = run("create", store, "--size", "4M", "--max-index-entries", "100")
    assert code == 0, out
    with open_store(store) as opened:
        opened.write(0, rand_page(1) * 3 + b"\x22" * P)
    code, out, _ = run("info", store, "--json")
    info = json.loads(out)
    assert (info["size_bytes"], info["max_index_entries"], info["max_share"]) == (4 << 20, 100, 254)
    code, out, _ = run("stats", store, "--json")
    stats = json.loads(out)
    assert set(stats) == STATS_KEYS
    assert (stats["mapped_pages"], stats["stored_pages"], stats["same_filled_pages"]) == (3, 1, 1)
    assert stats["dedup_ratio"] == 4.0  # four pages of data, one slot (docs: stats.py)
    assert stats["saved_bytes"] == 3 * P
    code, out, _ = run("stats", store)
    assert code == 0 and "dedup_ratio" in out and "4.00" in out
    code, out, _ = run("check", store)
    assert code == 0 and out.startswith("clean")
    code, out, _ = run("check", store, "--json")
    assert json.loads(out)["clean"] is True


def test_check_exit_codes_and_repair(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    with open_store(store) as opened:
        opened.write(0, rand_page(2))
    with open(os.path.join(store, "slots"), "r+b") as f:  # flip a bit of slot 1
        f.seek(P + 7)
        b = f.read(1)
        f.seek(P + 7)
        f.write(bytes([b[0] ^ 1]))
    code, out, _ = run("check", store)
    assert code == 1 and "fingerprints:" in out
    code, out, _ = run("check", store, "--repair")
    assert code == 3 and "repaired" in out and "data lost: bytes 0-4095" in out
    code, out, _ = run("check", store)
    assert code == 0


def test_errors_are_one_line(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    assert run("create", store, "--size", "1M")[0] == 0
    for args in (
        ("create", store, "--size", "1M"),
        ("create", str(tmp_path / "t"), "--size", "1000"),
        ("stats", str(tmp_path / "missing")),
        ("info", str(tmp_path)),
        ("check", str(tmp_path / "missing")),
    ):
        code, out, err = run(*args)
        assert code != 0, args
        assert err.count("\n") == 1 and err.startswith("dedupblk: "), (args, err)
        assert "Traceback" not in err + out
    code, _, err = run("create", str(tmp_path / "u"), "--size", "12Q")
    assert code == 2 and "12Q" in err


def test_every_command_has_help() -> None:
    for command in ("create", "info", "stats", "check", "serve", "devices", "bench", "dump"):
        code, out, _ = run(command, "--help")
        assert code == 0 and "Usage:" in out


def test_dump_prints_device_bytes(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    with open_store(store) as opened:
        opened.write(P, rand_page(5))
    result = CliRunner().invoke(main, ["dump", store, "4096", "4096"])
    assert result.stdout_bytes == rand_page(5)
