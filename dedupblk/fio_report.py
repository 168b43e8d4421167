"""Reading fio's JSON output (``fio --output-format=json``): the demo's table, and the benchmark
scripts in bench/ (through bench/fio_report.py)."""

from __future__ import annotations

import json


def timed_jobs(stdout: str) -> list[dict[str, object]]:
    """The jobs of a ``fio --output-format=json`` run, without their prefill phases. fio's nbd
    engine prints a line before the JSON, hence the search for its first brace; with
    ``--output-format=json,normal`` fio's usual text follows the JSON, and is left alone."""
    report, _ = json.JSONDecoder().raw_decode(stdout, stdout.index("{"))
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


def phase_table(stdout: str) -> list[str]:
    """One line per timed job (a phase of a job file): IOPS, MiB/s and p99 latency in ms."""
    lines = [f"{'phase':<14} {'IOPS':>9} {'MiB/s':>8} {'p99 ms':>8}"]
    for job in timed_jobs(stdout):
        iops, mib, p99 = measure(job)
        lines.append(f"{job['jobname']!s:<14} {iops:>9,.0f} {mib:>8.1f} {p99 / 1000:>8.2f}")
    return lines
