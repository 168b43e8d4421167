"""A store's usage and a server's requests in Prometheus' text format, by prometheus_client.

Served over HTTP by ``dedupblk serve --metrics [ADDR:]PORT`` (the nbdkit plugin's process for
NBD, the server's for ublk) and printed by ``dedupblk stats --format prometheus`` (for
node_exporter's textfile collector). Every series carries ``store="<the store's path>"``.

Store gauges, read from the open store's `Statistics` at each scrape (`StoreCollector`; the
words as in `dedupblk.store.stats`, whose docstring defines the savings):

    dedupblk_device_size_bytes   dedupblk_capacity_bytes   dedupblk_metadata_bytes
    dedupblk_logical_bytes       dedupblk_stored_bytes     dedupblk_saved_bytes
    dedupblk_mapped_pages        dedupblk_same_filled_pages
    dedupblk_zero_pages          dedupblk_lost_pages
    dedupblk_free_slots          dedupblk_index_entries

The dedup ratio is ``dedupblk_logical_bytes / dedupblk_stored_bytes``; the share saved is
``dedupblk_saved_bytes / dedupblk_logical_bytes``. A page and a slot are 4096 bytes.

While serving (`ServerMetrics`, one registry per server, nothing global):

    dedupblk_requests_total{op}                 requests answered, failed ones included
    dedupblk_request_errors_total{op,errno}     requests that failed, by errno name (ENOSPC...)
    dedupblk_commit_seconds (histogram)         each commit of a batch, its data sync included
    dedupblk_flush_seconds (histogram)          each flush (commit, then make it durable)

``op`` is the store call a request became: read, write, write_zeroes, trim, flush, extents (NBD
only), other (a ublk operation the server does not know). The latencies come from the store
itself (`dedupblk.store.store.StoreObserver`), so they cover its background commits too.
"""

from __future__ import annotations

import errno as errnos
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import InvalidRequest, MetricsError
from .store import Statistics

DEFAULT_ADDRESS: Final = "127.0.0.1"
OPS: Final = ("read", "write", "write_zeroes", "trim", "flush", "extents", "other")
# Seconds: a commit to tmpfs takes well under a millisecond, one that syncs a disk tens of them.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip

# (name, help, value from the statistics)
_GAUGES: Final[tuple[tuple[str, str, Callable[[Statistics], float]], ...]] = (
    ("dedupblk_device_size_bytes", "Size of the block device.", lambda s: s.size_bytes),
    ("dedupblk_capacity_bytes", "Data slots of the backend, in bytes.", lambda s: s.capacity_bytes),
    (
        "dedupblk_logical_bytes",
        "Bytes of the device's pages that are not zeros (in slots or kept as fills).",
        lambda s: s.logical_bytes,
    ),
    ("dedupblk_stored_bytes", "Bytes of the slots in use.", lambda s: s.stored_bytes),
    ("dedupblk_saved_bytes", "Logical bytes minus stored bytes.", lambda s: s.saved_bytes),
    ("dedupblk_metadata_bytes", "Bytes of the LMDB metadata in use.", lambda s: s.metadata_bytes),
    ("dedupblk_mapped_pages", "Pages stored in slots.", lambda s: s.mapped_pages),
    (
        "dedupblk_same_filled_pages",
        "Pages kept inline as one repeated 8-byte word.",
        lambda s: s.same_filled_pages,
    ),
    ("dedupblk_zero_pages", "Pages that read as zeros and take nothing.", lambda s: s.zero_pages),
    (
        "dedupblk_lost_pages",
        "Pages that read as EIO since a repair found their data damaged.",
        lambda s: s.lost_pages,
    ),
    ("dedupblk_free_slots", "Data slots free for new data.", lambda s: s.free_slots),
    ("dedupblk_index_entries", "Entries of the fingerprint index.", lambda s: s.index_entries),
)


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``ADDR:PORT`` or ``[IPV6]:PORT``; `InvalidRequest` otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host = DEFAULT_ADDRESS
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets before its port
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidRequest(
            f"bad metrics address {text!r}: PORT, ADDR:PORT or [IPV6]:PORT, port 1-65535"
        )
    return host, int(port_text)


def format_address(address: tuple[str, int]) -> str:
    """The inverse of `parse_address` (brackets around an IPv6 address)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_address_free(address: tuple[str, int]) -> None:
    """`MetricsError` if nothing could listen on ``address`` now (taken, or not this host's)."""
    host, port = address
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = found[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(sockaddr)
    except (OSError, UnicodeError) as exc:
        raise _cannot_serve(address, exc) from None


def _cannot_serve(address: tuple[str, int], exc: Exception) -> MetricsError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    return MetricsError(f"cannot serve metrics on {format_address(address)}: {reason}", errno=code)


class StoreCollector(Collector):
    """The store gauges, from ``statistics()`` at each collection."""

    def __init__(self, store_path: str, statistics: Callable[[], Statistics]) -> None:
        self._store_path = store_path
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        usage = self._statistics()
        for name, text, value in _GAUGES:
            family = GaugeMetricFamily(name, text, labels=["store"])
            family.add_metric([self._store_path], value(usage))
            yield family


class ServerMetrics:
    """The requests, errors and latencies of one server, in a `CollectorRegistry` of its own.

    A `dedupblk.store.store.StoreObserver` (give it to `open_store`), and the source of the
    counters file (`snapshot`, `dedupblk.runtime`). ``requests[op]`` is the counter a frontend
    increments once per request (or once per op and pass); `request_failed` counts an error.
    """

    def __init__(self, store_path: str) -> None:
        self.label = store_label(store_path)
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(
            "dedupblk_requests", "Requests answered, failed ones included, by operation.",
            ["store", "op"], registry=registry,
        )  # fmt: skip
        self._errors = Counter(
            "dedupblk_request_errors", "Requests that failed, by operation and errno.",
            ["store", "op", "errno"], registry=registry,
        )  # fmt: skip
        self._commit = Histogram(
            "dedupblk_commit_seconds", "Duration of each commit of a batch of pages.",
            ["store"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self._flush = Histogram(
            "dedupblk_flush_seconds", "Duration of each flush (commit, then make it durable).",
            ["store"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.requests = {op: self._requests.labels(self.label, op) for op in OPS}
        self._observe_commit = self._commit.labels(self.label).observe
        self._observe_flush = self._flush.labels(self.label).observe
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # -- StoreObserver ---------------------------------------------------------------------------

    def committed(self, seconds: float) -> None:
        self._observe_commit(seconds)

    def flushed(self, seconds: float) -> None:
        self._observe_flush(seconds)

    # -- the frontends' side ---------------------------------------------------------------------

    def request_failed(self, op: str, errno: int) -> None:
        self._errors.labels(self.label, op, errno_name(errno)).inc()

    def count_pass(self, ops: Iterable[tuple[str, int]]) -> None:
        """Count ``(op, how many)`` requests at once (the ublk handler, once per pass)."""
        for op, count in ops:
            self.requests[op].inc(count)

    def watch(self, statistics: Callable[[], Statistics]) -> None:
        """Report the store gauges from ``statistics()`` (the open store's) too."""
        self.registry.register(StoreCollector(self.label, statistics))

    def serve(self, address: tuple[str, int]) -> None:
        """Answer scrapes of the registry over HTTP on ``address``, from a daemon thread."""
        host, port = address
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, UnicodeError) as exc:
            raise _cannot_serve(address, exc) from None

    def stop_serving(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join()

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data (the counters file, `dedupblk.runtime`)."""
        requests: dict[str, int] = {}
        errors: dict[str, dict[str, int]] = {}
        latency: dict[str, dict[str, int | float]] = {}
        for metric in (self._requests, self._errors):
            for family in metric.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total") or not sample.value:
                        continue
                    op = sample.labels["op"]
                    if "errno" in sample.labels:
                        errors.setdefault(op, {})[sample.labels["errno"]] = int(sample.value)
                    else:
                        requests[op] = int(sample.value)
        for key, histogram in (("commits", self._commit), ("flushes", self._flush)):
            for family in histogram.collect():
                for sample in family.samples:
                    if sample.name.endswith(("_count", "_sum")):
                        if sample.name.endswith("_count"):
                            latency.setdefault(key, {})["count"] = int(sample.value)
                        else:
                            latency.setdefault(key, {})["seconds"] = sample.value
        return {"requests": requests, "errors": errors, **latency}


def store_label(store_path: str) -> str:
    """The ``store`` label: the store's real path, whichever path named it."""
    return os.path.realpath(store_path)


# Numbers with two names, where `errno.errorcode` gives the less known one.
_ERRNO_NAMES: Final = {
    errnos.EOPNOTSUPP: "EOPNOTSUPP",
    errnos.EAGAIN: "EAGAIN",
    errnos.EDEADLK: "EDEADLK",
}


def errno_name(errno: int) -> str:
    """The ``errno`` label: ENOSPC, EIO... (the number for one without a name)."""
    return _ERRNO_NAMES.get(errno) or errnos.errorcode.get(errno, str(errno))


class _SnapshotCollector(Collector):
    """The request counters of a counters file (`dedupblk.runtime`), for `exposition`."""

    def __init__(self, store_path: str, record: Mapping[str, Any]) -> None:
        self._store_path = store_path
        self._record = record

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "dedupblk_requests", "Requests answered, failed ones included, by operation.",
            labels=["store", "op"],
        )  # fmt: skip
        for op, count in sorted(self._record.get("requests", {}).items()):
            requests.add_metric([self._store_path, op], count)
        errors = CounterMetricFamily(
            "dedupblk_request_errors", "Requests that failed, by operation and errno.",
            labels=["store", "op", "errno"],
        )  # fmt: skip
        for op, by_errno in sorted(self._record.get("errors", {}).items()):
            for name, count in sorted(by_errno.items()):
                errors.add_metric([self._store_path, op, name], count)
        yield requests
        yield errors


def exposition(
    store_path: str, statistics: Statistics, counters: Mapping[str, Any] | None = None
) -> str:
    """The store gauges, and the request counters of a running server's counters file when
    given, in Prometheus' text format."""
    label = store_label(store_path)
    registry = CollectorRegistry()
    registry.register(StoreCollector(label, lambda: statistics))
    if counters is not None:
        registry.register(_SnapshotCollector(label, counters))
    return generate_latest(registry).decode()
