"""The click CLI: commands, JSON shapes, exit codes, one-line errors (never a traceback, a full
stdout included), options of the other frontend refused, and `dump` in bounded memory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dedupblk import cli
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
    assert code == 0 and "dedup ratio 4.00" in out
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
    commands = ("create", "info", "stats", "check", "serve", "devices", "bench", "dump")
    for command in (*commands, "list", "stop"):
        code, out, _ = run(command, "--help")
        assert code == 0 and "Usage:" in out


def test_dump_prints_device_bytes(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    with open_store(store) as opened:
        opened.write(P, rand_page(5))
    result = CliRunner().invoke(main, ["dump", store, "4096", "4096"])
    assert result.stdout_bytes == rand_page(5)


def dedupblk(
    *args: str, stdout: Any = subprocess.PIPE, limit_address_space: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a program (a traceback would reach stderr here, unlike under CliRunner)."""

    def limit() -> None:
        if limit_address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_address_space, limit_address_space))

    return subprocess.run(
        [sys.executable, "-m", "dedupblk.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
        text=True, timeout=300, check=False, preexec_fn=limit,
    )  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("dedupblk") and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("create", "{tmp}/a", "--size", "1000000T"), 2, "more than 4294967294 slots"),
        (("create", "{tmp}/b", "--size", "1M", "--backend-size", "1048576T"), 2,
         "bad backend size"),
        (("create", "{tmp}/c", "--size", "99999999999999999999T"), 2, "bad size"),
        (("create", "{tmp}/d", "--size", "1M", "--max-index-entries", "99999999999999999999999"),
         2, "bad max-index-entries"),
        (("create", "{tmp}/e", "--size", "1M", "--backend", "/no/dir/x"), 1,
         "cannot create backend /no/dir/x"),
        (("bench", "--rounds", "0"), 2, "--rounds 0: must be at least 1"),
        (("bench", "--pages", "0"), 2, "--pages 0: must be at least 1"),
        (("bench", "--dir", "/missing"), 2, "cannot make a directory in /missing"),
        (("dump", "{tmp}/s", "0", "2M"), 2, "outside the device"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_never_a_traceback(
    tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    run("create", str(tmp_path / "s"), "--size", "1M")
    result = dedupblk(*(arg.format(tmp=tmp_path) for arg in args))
    assert_one_line(result, code, message)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [("stats", "{store}"), ("stats", "{store}", "--json"), ("info", "{store}"),
             ("dump", "{store}", "0", "64K")],
)  # fmt: skip
def test_a_full_stdout_is_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    with open(os.devnull, "w") as null, open("/dev/full", "w") as full:
        assert dedupblk("info", store, stdout=null).returncode == 0
        result = dedupblk(*(arg.format(store=store) for arg in args), stdout=full)
    assert_one_line(result, 1, "cannot write to stdout: No space left on device")


def test_a_closed_pipe_is_one_line(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "4M")
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the write gets EPIPE (Python ignores SIGPIPE)
    with os.fdopen(writer, "w") as pipe:
        result = dedupblk("dump", store, "0", "4M", stdout=pipe)
    assert_one_line(result, 1, "cannot write to stdout: Broken pipe")


DEVICE = 1 << 30
ADDRESS_SPACE = 256 << 20  # the interpreter, lmdb and the store need far less


def test_dump_streams_in_bounded_memory(tmp_path: Path) -> None:
    # A 1 GiB dump under a 256 MiB address-space limit: read in one piece it cannot fit.
    store = str(tmp_path / "s")
    run("create", store, "--size", "1G")
    with open_store(store) as opened:
        opened.write(DEVICE - P, rand_page(9))
    with open(os.devnull, "w") as null:
        result = dedupblk("dump", store, "0", "1G", stdout=null, limit_address_space=ADDRESS_SPACE)
    assert result.returncode == 0, result.stderr


def test_dump_in_chunks_gives_the_device_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    with open_store(store) as opened:
        opened.write(0, rand_page(1) + b"\x00" * P + rand_page(2) + rand_page(1))
        expected = opened.read(100, 5 * P)
    monkeypatch.setattr(cli, "DUMP_CHUNK", 5000)  # chunks that cut pages anywhere
    result = CliRunner().invoke(main, ["dump", store, "100", str(5 * P)])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == expected


UBLK_ONLY = [
    ["--queues", "2"],
    ["--depth", "8"],
    ["--dev-id", "3"],
    ["--swap"],
    ["--swap-priority", "5"],
    ["--swap-discard"],
    ["--recover", "1"],
    ["--swap-placement-may-hang"],
    ["--queues", "1"],  # the default's value, given: still refused
]
NBD_ONLY = [
    ["--socket", "/tmp/s.sock"], ["--port", "10809"], ["--bind", "::1"], ["--readonly"],
    ["--foreground"], ["--tls", "require"], ["--tls-certificates", "/certs"],
    ["--tls-psk", "/keys.psk"], ["--tcp-without-tls-for-every-local-user"],
]  # fmt: skip


def refuse_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from dedupblk.frontends import ublk  # noqa: PLC0415
    from dedupblk.nbd import launcher  # noqa: PLC0415

    def fail(*args: object, **kwargs: object) -> int:
        raise AssertionError("served")

    monkeypatch.setattr(launcher, "serve", fail)
    monkeypatch.setattr(ublk, "serve", fail)


@pytest.mark.parametrize(
    ("frontend", "option"),
    [("nbd", option) for option in UBLK_ONLY] + [("ublk", option) for option in NBD_ONLY],
)
def test_options_of_the_other_frontend_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frontend: str, option: list[str]
) -> None:
    refuse_to_serve(monkeypatch)
    code, out, err = run("serve", str(tmp_path), "--frontend", frontend, *option)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"dedupblk: {option[0]}: an option of"), err
    assert out == ""


def test_every_option_of_the_other_frontend_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_to_serve(monkeypatch)
    code, _, err = run("serve", str(tmp_path), "--swap", "--dev-id", "3")  # nbd by default
    assert code == 2
    assert err == "dedupblk: --dev-id, --swap: options of --frontend ublk, not nbd\n"


def record_serve(monkeypatch: pytest.MonkeyPatch, frontend: object) -> list[dict[str, object]]:
    """Replace ``frontend.serve`` with a recorder: the keyword arguments of each call."""
    served: list[dict[str, object]] = []

    def record(store: str, **kwargs: object) -> int:
        served.append(kwargs)
        return 0

    monkeypatch.setattr(frontend, "serve", record)
    return served


def test_defaults_of_the_other_frontend_are_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dedupblk.nbd import launcher  # noqa: PLC0415

    served = record_serve(monkeypatch, launcher)
    code, _, err = run("serve", str(tmp_path), "--frontend", "nbd", "--readonly")
    assert code == 0, err
    assert served[0]["readonly"] is True


def test_the_swap_risk_reaches_the_ublk_frontend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dedupblk.frontends import ublk  # noqa: PLC0415

    served = record_serve(monkeypatch, ublk)
    for risk in ([], ["--swap-placement-may-hang"]):
        code, _, err = run("serve", str(tmp_path), "--frontend", "ublk", "--swap", *risk)
        assert code == 0, err
    assert [s["swap_placement_may_hang"] for s in served] == [False, True]


def test_stats_for_people_in_binary_units(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    run("create", store, "--size", "4M", "--backend-size", "2M")  # 511 slots
    with open_store(store) as opened:  # 4 copies of one page, a fill, one unique page
        opened.write(0, rand_page(1) * 4 + b"\x22" * P + rand_page(2))
    code, out, err = run("stats", store)
    assert code == 0, err
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["size"] == "4 MiB, 1024 pages"
    assert rows["capacity"] == "2.0 MiB, 511 slots"
    assert rows["used"] == "8 KiB, 2 slots (0.4%)"
    assert rows["available"] == "2.0 MiB, 509 slots"
    assert rows["logical"] == "24 KiB, 5 pages in slots and 1 same-filled"
    # stats.py's one definition: saved = logical - stored, saving% = saved / logical.
    assert rows["saved"] == "16 KiB (66.7%), dedup ratio 3.00"
    assert rows["zero pages"].startswith("1018 ")
    assert rows["same-filled"].startswith("1 ")
    assert "served by" not in rows  # nobody serves it
    code, out, _ = run("stats", store, "--help")
    assert "saving% is saved over logical" in out and "logical over stored" in out


def test_stats_shows_the_counters_of_a_live_server(tmp_path: Path) -> None:
    from dedupblk.runtime import counters_path, process_start_time, write_record  # noqa: PLC0415

    store = str(tmp_path / "s")
    run("create", store, "--size", "1M")
    write_record(counters_path(store), {
        "pid": os.getpid(), "started": process_start_time(os.getpid()), "updated": 1.5,
        "requests": {"read": 12, "write": 5}, "errors": {"write": {"ENOSPC": 2}},
        "commits": {"count": 4, "seconds": 0.01}, "flushes": {"count": 1, "seconds": 0.5},
    })  # fmt: skip
    code, out, _ = run("stats", store)
    assert code == 0
    assert f"pid {os.getpid()}" in out
    assert "read 12, write 5" in out and "write ENOSPC 2" in out
    assert "4, mean 2.50 ms" in out and "1, mean 500.00 ms" in out
    code, out, _ = run("stats", store, "--json")
    served = json.loads(out)["served"]
    assert served["requests"] == {"read": 12, "write": 5}
    assert served["errors"] == {"write": {"ENOSPC": 2}}
    assert served["pid"] == os.getpid()
    code, out, _ = run("stats", store, "--format", "prometheus")
    assert 'dedupblk_requests_total{op="write",store=' in out
    assert 'dedupblk_request_errors_total{errno="ENOSPC",op="write",store=' in out


def test_create_warns_when_the_backend_cannot_hold_the_device(tmp_path: Path) -> None:
    result = dedupblk("create", str(tmp_path / "s"), "--size", "64M", "--backend-size", "1M")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "dedupblk: warning: the backend holds 255 slots (1020 KiB); the device has 16384 pages: "
        "writes of more than 255 distinct pages will fail with ENOSPC\n"
    )
    result = dedupblk("create", str(tmp_path / "t"), "--size", "64M")  # room for every page
    assert result.returncode == 0 and result.stderr == ""


def test_bench_help_shows_its_options() -> None:
    code, out, _ = run("bench", "--help")
    assert code == 0
    for option in ("--pages INTEGER", "--rounds INTEGER", "--dir DIRECTORY"):
        assert option in out, out
    assert "[default: 32768]" in out and "[default: 3]" in out


@pytest.mark.parametrize(
    ("frontend", "given", "address"),
    [("nbd", "9464", ("127.0.0.1", 9464)), ("ublk", "0.0.0.0:9464", ("0.0.0.0", 9464)),
     ("nbd", "[::1]:9100", ("::1", 9100))],
)  # fmt: skip
def test_serve_metrics_reaches_either_frontend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frontend: str, given: str,
    address: tuple[str, int],
) -> None:  # fmt: skip
    from dedupblk.frontends import ublk  # noqa: PLC0415
    from dedupblk.nbd import launcher  # noqa: PLC0415

    served: list[object] = []

    def record(store: str, **kwargs: object) -> int:
        served.append(kwargs["metrics"])
        return 0

    monkeypatch.setattr(launcher, "serve", record)
    monkeypatch.setattr(ublk, "serve", record)
    code, _, err = run("serve", str(tmp_path), "--frontend", frontend, "--metrics", given)
    assert code == 0, err
    assert served == [address]


def test_a_bad_metrics_address_is_one_line(tmp_path: Path) -> None:
    result = dedupblk("serve", str(tmp_path), "--metrics", "localhost")
    assert_one_line(result, 2, "bad metrics address 'localhost'")


def test_devices_has_device_answers_with_its_exit_status(monkeypatch: Any) -> None:
    """What the systemd unit decides recovery with: the records `devices --json` prints."""
    from dedupblk.ublk import control  # noqa: PLC0415

    listed = [
        control.Device(
            dev_id=7, state="quiesced", queues=1, depth=64, max_io_buf_bytes=65536,
            server_pid=1234, server_alive=False, flags=0, block_device="/dev/ublkb7",
            char_device="/dev/ublkc7",
        )
    ]  # fmt: skip
    monkeypatch.setattr(control, "list_devices", lambda: listed)
    code, out, _ = run("devices", "--json")
    assert [device["dev_id"] for device in json.loads(out)] == [7]
    assert run("devices", "--has-device", "7") == (0, "", "")
    assert run("devices", "--has-device", "3") == (1, "", "")
    code, out, err = run("devices", "--has-device", "7", "--json")
    assert (code, out) == (2, "")
    assert err == "dedupblk: --has-device answers with its exit status alone\n"
