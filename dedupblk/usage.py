"""``dedupblk stats`` for people: a store's usage in binary units and percent, and the counters
of the process serving it (`dedupblk.runtime`).

The words and the one definition of the savings are `dedupblk.store.stats`'s: logical bytes are
the pages that are not zeros, stored bytes the slots in use ("used"), saved is their difference,
saving% its share of logical, the dedup ratio logical over stored; use% is stored over capacity.
"""

from __future__ import annotations

from typing import Any

from .runtime import SNAPSHOT_SECONDS
from .sizes import format_size
from .store import PAGE_SIZE, Statistics

SERVED_KEYS = ("pid", "updated", "requests", "errors", "commits", "flushes")


def describe_usage(usage: Statistics, counters: dict[str, Any] | None = None) -> list[str]:
    """The lines of ``stats``; with ``counters`` (a server's), its requests and errors too."""
    size, capacity, stored = usage.size_bytes, usage.capacity_bytes, usage.stored_bytes
    ratio = f"dedup ratio {usage.dedup_ratio:.2f}" if usage.dedup_ratio else "nothing stored"
    lost = " (read as EIO until written or trimmed)" if usage.lost_pages else ""
    rows = [
        ("size", f"{format_size(size)}, {size // PAGE_SIZE} pages"),
        ("capacity", f"{format_size(capacity)}, {capacity // PAGE_SIZE} slots"),
        ("used", f"{format_size(stored)}, {usage.stored_pages} slots ({usage.used_percent:.1f}%)"),
        ("available", f"{format_size(usage.free_slots * PAGE_SIZE)}, {usage.free_slots} slots"),
        (
            "logical",
            f"{format_size(usage.logical_bytes)}, {usage.mapped_pages} pages in slots and "
            f"{usage.same_filled_pages} same-filled",
        ),
        ("saved", f"{format_size(usage.saved_bytes)} ({usage.saving_percent:.1f}%), {ratio}"),
        (
            "zero pages",
            f"{usage.zero_pages} ({format_size(usage.zero_pages * PAGE_SIZE)}, no space)",
        ),
        ("same-filled", f"{usage.same_filled_pages} (kept inline, no slot)"),
        ("lost pages", f"{usage.lost_pages}{lost}"),
        ("index", f"{usage.index_entries} entries"),
        ("metadata", format_size(usage.metadata_bytes)),
    ]
    if counters is not None:
        rows += _describe_counters(counters)
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {text}" for name, text in rows]


def served_record(counters: dict[str, Any]) -> dict[str, Any]:
    """The ``served`` object of ``stats --json``: the server's counters, raw."""
    return {key: counters[key] for key in SERVED_KEYS if key in counters}


def _describe_counters(counters: dict[str, Any]) -> list[tuple[str, str]]:
    requests: dict[str, int] = counters.get("requests", {})
    errors: dict[str, dict[str, int]] = counters.get("errors", {})
    failures = [
        f"{op} {name} {count}"
        for op, by_errno in sorted(errors.items())
        for name, count in sorted(by_errno.items())
    ]
    rows = [
        ("served by", f"pid {counters.get('pid')} (counters at most {SNAPSHOT_SECONDS:g} s old)"),
        ("requests", ", ".join(f"{op} {n}" for op, n in sorted(requests.items())) or "none"),
        ("errors", ", ".join(failures) or "none"),
    ]
    for key in ("commits", "flushes"):
        timing = counters.get(key, {})
        count, seconds = timing.get("count", 0), timing.get("seconds", 0.0)
        mean = f", mean {seconds / count * 1000:.2f} ms" if count else ""
        rows.append((key, f"{count}{mean}"))
    return rows
