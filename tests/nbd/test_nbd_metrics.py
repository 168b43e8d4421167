"""Metrics of a real nbdkit: the plugin's Prometheus endpoint (``metrics=``, and ``dedupblk serve
--metrics``) scraped over HTTP and read with prometheus_client's own parser, and the counters
``dedupblk stats`` shows while the store is served."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dedupblk.store import create_store

from .nbd_helpers import PAGE_SIZE, ServerFactory, assert_clean
from .test_nbd_serve import read_uri, start_serve, stop

pytestmark = pytest.mark.nbd

WAIT_SECONDS = 30.0  # a bound on polling, never a measurement

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, store: Path, **labels: str) -> float:
    return found.get((name, frozenset({"store": os.path.realpath(store), **labels}.items())), 0.0)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.1)


def stats_json(store: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "dedupblk.cli", "stats", str(store), "--json"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_plugin_serves_what_was_written_and_stats_shows_its_counters(
    nbd_server: ServerFactory,
) -> None:
    port = free_port()
    # 40 slots: 32 distinct pages fit, 16 more do not.
    server = nbd_server(1 << 20, params=[f"metrics={port}"], backend_size=41 * PAGE_SIZE)
    rng = random.Random(5)
    distinct = [rng.randbytes(PAGE_SIZE) for _ in range(32)]
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for page, data in enumerate(distinct):
        h.pwrite(data, page * PAGE_SIZE)
    for page, data in enumerate(distinct):  # the same contents again: no new slot
        h.pwrite(data, (64 + page) * PAGE_SIZE)
    h.flush()
    for page in range(8):
        assert h.pread(PAGE_SIZE, page * PAGE_SIZE) == distinct[page]
    found = scrape(port)
    store = server.store
    assert value(found, "dedupblk_requests_total", store, op="write") >= 64
    assert value(found, "dedupblk_requests_total", store, op="read") >= 8
    assert value(found, "dedupblk_requests_total", store, op="flush") >= 1
    assert value(found, "dedupblk_stored_bytes", store) == 32 * PAGE_SIZE
    assert value(found, "dedupblk_logical_bytes", store) == 64 * PAGE_SIZE
    assert value(found, "dedupblk_saved_bytes", store) == 32 * PAGE_SIZE
    assert value(found, "dedupblk_free_slots", store) == 40 - 32
    assert value(found, "dedupblk_commit_seconds_count", store) >= 1
    assert value(found, "dedupblk_flush_seconds_count", store) >= 1
    assert value(found, "dedupblk_request_errors_total", store, op="write", errno="ENOSPC") == 0

    failed = 0
    for page in range(16):  # new data until the slots run out
        try:
            h.pwrite(rng.randbytes(PAGE_SIZE), (128 + page) * PAGE_SIZE)
        except nbd.Error:
            failed += 1
    assert failed > 0
    found = scrape(port)
    assert (
        value(found, "dedupblk_request_errors_total", store, op="write", errno="ENOSPC") == failed
    )
    assert value(found, "dedupblk_requests_total", store, op="write") >= 64 + 16

    # `dedupblk stats` in another process gets the counters from the server's counters file.
    def counted() -> bool:
        served = stats_json(store).get("served")
        return isinstance(served, dict) and served["requests"].get("write", 0) >= 64 + 16

    wait_for(counted, "stats to show the server's write counter")
    served = stats_json(store)["served"]
    assert isinstance(served, dict)
    assert served["errors"] == {"write": {"ENOSPC": failed}}
    assert server.process is not None and served["pid"] == server.process.pid
    h.shutdown()
    assert server.stop() == 0
    assert "served" not in stats_json(store)  # its process is gone
    assert_clean(store)


def test_serve_metrics_starts_the_endpoint_in_the_plugin(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    port = free_port()
    sock = tmp_path / "s.sock"
    with start_serve(
        str(store), socket=str(sock), foreground=True, metrics=("127.0.0.1", port)
    ) as process:
        uri = read_uri(process)
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\x17" * PAGE_SIZE + random.Random(1).randbytes(PAGE_SIZE), 0)
        h.flush()
        found = scrape(port)
        assert value(found, "dedupblk_requests_total", store, op="write") == 1
        assert value(found, "dedupblk_same_filled_pages", store) == 1
        assert value(found, "dedupblk_stored_bytes", store) == PAGE_SIZE
        h.shutdown()
        assert stop(process) == 0
    with pytest.raises(OSError):  # the endpoint went with the server
        scrape(port)


def test_a_taken_metrics_port_stops_serve_before_it_serves(tmp_path: Path) -> None:
    store = tmp_path / "store"
    create_store(store, 1 << 20)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = tmp_path / "s.sock"
        with start_serve(str(store), socket=str(sock), foreground=True,
                         metrics=("127.0.0.1", port)) as process:  # fmt: skip
            out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert out == ""
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in err
    assert err.count("\n") == 1, err
    assert not sock.exists()
