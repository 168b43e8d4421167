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

While serving (`ServerMetrics`, one registry per server, nothing global, over the counters the
server keeps without this module: `dedupblk.counters`):

    dedupblk_requests_total{op}                 requests answered, failed ones included
    dedupblk_request_errors_total{op,errno}     requests that failed, by errno name (ENOSPC...)
    dedupblk_commit_seconds (histogram)         each commit of a batch, its data sync included
    dedupblk_flush_seconds (histogram)          each flush (commit, then make it durable)

``op`` is the store call a request became: read, write, write_zeroes, trim, flush, extents (NBD
only), other (a ublk operation the server does not know). The latencies come from the store
itself (`dedupblk.store.store.StoreObserver`), so they cover its background commits too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .counters import LATENCY_BUCKETS, OPS, ServerCounters, cannot_serve
from .store import Statistics

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
    """One server's `ServerCounters` and its store's gauges, in a `CollectorRegistry` of its
    own (nothing global), served over HTTP by `serve`."""

    def __init__(self, store_path: str, counters: ServerCounters) -> None:
        self.label = store_label(store_path)
        self.registry = CollectorRegistry()
        self.registry.register(_CountersCollector(self.label, counters))
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def watch(self, statistics: Callable[[], Statistics]) -> None:
        """Report the store gauges from ``statistics()`` (the open store's) too."""
        self.registry.register(StoreCollector(self.label, statistics))

    def serve(self, address: tuple[str, int]) -> None:
        """Answer scrapes of the registry over HTTP on ``address``, from a daemon thread."""
        host, port = address
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, UnicodeError) as exc:
            raise cannot_serve(address, exc) from None

    def stop_serving(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join()


_REQUESTS: Final = ("dedupblk_requests", "Requests answered, failed ones included, by operation.")
_ERRORS: Final = ("dedupblk_request_errors", "Requests that failed, by operation and errno.")
_LATENCIES: Final = {
    "commits": ("dedupblk_commit_seconds", "Duration of each commit of a batch of pages."),
    "flushes": ("dedupblk_flush_seconds", "Duration of each flush (commit, then make it durable)."),
}
_BOUNDS: Final = [str(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]  # as Histogram writes them


class _CountersCollector(Collector):
    """A running server's `ServerCounters`, read at each scrape."""

    def __init__(self, label: str, counters: ServerCounters) -> None:
        self._label = label
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        snapshot = self._counters.snapshot()
        record = {**snapshot, "requests": {op: snapshot["requests"].get(op, 0) for op in OPS}}
        yield from _counter_families(self._label, record)
        for key, (counts, seconds, _) in self._counters.histograms().items():
            family = HistogramMetricFamily(*_LATENCIES[key], labels=["store"])
            cumulative, total = [], 0
            for bound, count in zip(_BOUNDS, counts, strict=True):
                total += count
                cumulative.append((bound, total))
            family.add_metric([self._label], cumulative, sum_value=seconds)
            yield family


def _counter_families(label: str, record: Mapping[str, Any]) -> Iterator[Metric]:
    """The request and error counters of a snapshot (`ServerCounters.snapshot`)."""
    requests = CounterMetricFamily(*_REQUESTS, labels=["store", "op"])
    for op, count in record.get("requests", {}).items():
        requests.add_metric([label, op], count)
    errors = CounterMetricFamily(*_ERRORS, labels=["store", "op", "errno"])
    for op, by_errno in sorted(record.get("errors", {}).items()):
        for name, count in sorted(by_errno.items()):
            errors.add_metric([label, op, name], count)
    yield requests
    yield errors


def store_label(store_path: str) -> str:
    """The ``store`` label: the store's real path, whichever path named it."""
    return os.path.realpath(store_path)


class _SnapshotCollector(Collector):
    """The request counters of a counters file (`dedupblk.runtime`), for `exposition`."""

    def __init__(self, label: str, record: Mapping[str, Any]) -> None:
        self._label = label
        self._record = record

    def collect(self) -> Iterator[Metric]:
        yield from _counter_families(self._label, self._record)


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
