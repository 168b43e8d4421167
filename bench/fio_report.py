"""Reading fio's JSON output, shared by the benchmark scripts in this folder: the functions live
in `dedupblk.fio_report` (the demo's table uses them too)."""

from __future__ import annotations

from dedupblk.fio_report import measure, timed_jobs

__all__ = ["measure", "timed_jobs"]
