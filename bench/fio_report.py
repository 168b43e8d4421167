"""Reading fio's JSON output, shared by the benchmark scripts in this folder."""

from __future__ import annotations

import json


def timed_jobs(stdout: str) -> list[dict[str, object]]:
    """The jobs of a ``fio --output-format=json`` run, without their prefill phases. fio's nbd
    engine prints a line before the JSON, hence the search for its first brace."""
    report = json.loads(stdout[stdout.index("{") :])
    return [j for j in report["jobs"] if not str(j["jobname"]).startswith("prefill")]


def measure(job_report: dict[str, object]) -> tuple[float, float, float]:
    """IOPS, MiB/s and p99 completion latency (µs) of a job, reads and writes together."""
    iops = mib = p99 = 0.0
    for direction in ("read", "write"):
        stats = job_report[direction]
        assert isinstance(stats, dict)
        if stats["iops"] <= 0:
            continue
        iops += stats["iops"]
        mib += stats["bw_bytes"] / (1 << 20)
        p99 = max(p99, stats["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000)
    return iops, mib, p99
