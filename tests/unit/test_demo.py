"""The demo's closing table, built from a recorded fio run: ``make demo``'s fio.log (fio 3.33
over NBD, ``--output-format=json,normal``: the JSON report, then fio's usual text, whose IOPS and
bandwidth lines the figures below agree with) and a real store's ``stats --json``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dedupblk.demo import summary
from dedupblk.store import PAGE_SIZE, create_store, open_store, read_statistics
from tests.conftest import rand_page

RECORDED = Path(__file__).parent / "data" / "fio-swap-mix.log"


def test_the_demo_ends_with_a_table_of_fio_phases_and_the_store(tmp_path: Path) -> None:
    create_store(tmp_path / "s", 1 << 20, backend_size=1 << 20)
    with open_store(tmp_path / "s") as store:  # 4 pages of one content, 2 unique
        store.write(0, rand_page(1) * 4 + rand_page(2) + rand_page(3))
    _, usage = read_statistics(tmp_path / "s")
    lines = summary(RECORDED.read_text(), asdict(usage))
    assert lines[0].split() == ["phase", "IOPS", "MiB/s", "p99", "ms"]
    phases = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    # The prefill job is left out; a mixed phase adds its reads and writes.
    assert phases == {
        "dup-writes": ["1,724", "6.7", "421.53"],
        "zero-writes": ["2,112", "8.2", "221.25"],
        "mixed": ["2,022", "7.9", "383.78"],
        "reads": ["5,576", "21.8", "77.07"],
    }
    assert lines[5] == ""
    store_rows = {line[:14].strip(): line[14:].split("  (") for line in lines[6:]}
    assert [value.strip() for value, _ in store_rows.values()] == [
        "24 KiB", "12 KiB", "12 KiB", "2.00"
    ]  # fmt: skip
    assert list(store_rows) == ["logical", "stored", "saved", "dedup ratio"]
    assert store_rows["stored"][1] == f"{100 * 3 / 255:.1f}% of the backend's 1020 KiB)"
    assert store_rows["saved"][1] == "50.0% of logical)"
    assert usage.stored_bytes == 3 * PAGE_SIZE
