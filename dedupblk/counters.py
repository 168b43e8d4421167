"""What a server counts (requests, errors, commit and flush latencies) and where its metrics
endpoint listens, in plain Python.

prometheus_client, its HTTP server and what they import cost a ublk server about 5 MiB of memory
it locks; so the server counts here, and only ``--metrics`` loads `dedupblk.metrics`, which
exports these counters. The counters file `dedupblk stats` reads (`dedupblk.runtime`) is
`ServerCounters.snapshot`.
"""

from __future__ import annotations

import bisect
import errno as errnos
import socket
import threading
from collections.abc import Iterable
from typing import Any, Final

from .errors import InvalidRequest, MetricsError

DEFAULT_ADDRESS: Final = "127.0.0.1"
OPS: Final = ("read", "write", "write_zeroes", "trim", "flush", "extents", "other")
# Seconds: a commit to tmpfs takes well under a millisecond, one that syncs a disk tens of them.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


class Latencies:
    """A histogram of durations over `LATENCY_BUCKETS`: ``counts[i]`` durations fell in bucket
    ``i`` (at most its bound, above the one before; the last is past every bound)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        self.count += 1


class ServerCounters:
    """The requests, errors and latencies of one server.

    A `dedupblk.store.store.StoreObserver` (give it to `open_store`). A frontend calls `count` once
    per request or `count_pass` once per pass, and `request_failed` for each failure. Every
    method may be called from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = dict.fromkeys(OPS, 0)
        self.errors: dict[tuple[str, str], int] = {}  # (op, errno name) -> count
        self.commits = Latencies()
        self.flushes = Latencies()

    # -- StoreObserver ---------------------------------------------------------------------------

    def committed(self, seconds: float) -> None:
        with self._lock:
            self.commits.observe(seconds)

    def flushed(self, seconds: float) -> None:
        with self._lock:
            self.flushes.observe(seconds)

    # -- the frontends' side ---------------------------------------------------------------------

    def count(self, op: str) -> None:
        with self._lock:
            self.requests[op] += 1

    def count_pass(self, ops: Iterable[tuple[str, int]]) -> None:
        """Count ``(op, how many)`` requests at once (the ublk handler, once per pass)."""
        with self._lock:
            for op, count in ops:
                self.requests[op] += count

    def request_failed(self, op: str, errno: int) -> None:
        key = (op, errno_name(errno))
        with self._lock:
            self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data: ``requests`` {op: n} and ``errors`` {op: {errno: n}}
        (those not zero), ``commits`` and ``flushes`` {count, seconds}."""
        with self._lock:
            errors: dict[str, dict[str, int]] = {}
            for (op, name), count in sorted(self.errors.items()):
                errors.setdefault(op, {})[name] = count
            return {
                "requests": {op: n for op, n in self.requests.items() if n},
                "errors": errors,
                "commits": {"count": self.commits.count, "seconds": self.commits.seconds},
                "flushes": {"count": self.flushes.count, "seconds": self.flushes.seconds},
            }

    def histograms(self) -> dict[str, tuple[list[int], float, int]]:
        """``commits`` and ``flushes``: (counts per bucket, seconds, count), copied at once."""
        with self._lock:
            return {
                name: (list(latencies.counts), latencies.seconds, latencies.count)
                for name, latencies in (("commits", self.commits), ("flushes", self.flushes))
            }


# Numbers with two names, where `errno.errorcode` gives the less known one.
_ERRNO_NAMES: Final = {
    errnos.EOPNOTSUPP: "EOPNOTSUPP",
    errnos.EAGAIN: "EAGAIN",
    errnos.EDEADLK: "EDEADLK",
}


def errno_name(errno: int) -> str:
    """The ``errno`` label: ENOSPC, EIO... (the number for one without a name)."""
    return _ERRNO_NAMES.get(errno) or errnos.errorcode.get(errno, str(errno))


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
        raise cannot_serve(address, exc) from None


def cannot_serve(address: tuple[str, int], exc: Exception) -> MetricsError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    return MetricsError(f"cannot serve metrics on {format_address(address)}: {reason}", errno=code)
