"""`dedupblk estimate`: images of known duplicate structure give exact counts, and each agrees
with the `stats` of a store the image was then imported into; a real ext4 image too; memory
stays bounded (the fingerprints go through sorted runs on disk)."""

from __future__ import annotations

import collections
import json
import os
import random
import struct
import tracemalloc
from pathlib import Path

from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.estimate import DistinctCounter, Estimate, estimate_image, human_bytes
from dedupblk.store import Statistics, create_store, open_store, read_statistics
from tests.fsimage import ext4_image

P = 4096
COUNTS = ("mapped_pages", "same_filled_pages", "zero_pages", "stored_pages", "index_entries")
EXACT = (*COUNTS, "size_bytes", "logical_bytes", "stored_bytes", "saved_bytes")


def rand_pages(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(P) for _ in range(n)]


def fill(word: int) -> bytes:
    return struct.pack("<Q", word) * (P // 8)


def counted_pages(first: int, n: int) -> bytes:
    """``n`` distinct data pages, cheap to make: each holds its number in its first word."""
    return b"".join(struct.pack("<Q", i + 1) + bytes(P - 8) for i in range(first, first + n))


def write_image(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def imported(
    image: Path, tmp_path: Path, *, size: int | None = None, max_share: int = 254
) -> Statistics:
    """The stats of a new store after the image was written into it in 1 MiB pieces."""
    store = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"
    create_store(store, size or -(-image.stat().st_size // P) * P, max_share=max_share)
    with image.open("rb") as f, open_store(store) as opened:
        offset = 0
        while piece := f.read(1 << 20):
            opened.write(offset, piece)
            offset += len(piece)
        opened.flush()
    return read_statistics(store)[1]


def assert_agrees(estimate: Estimate, real: Statistics) -> None:
    predicted = estimate.statistics
    for key in EXACT:
        assert getattr(predicted, key) == getattr(real, key), key
    assert predicted.dedup_ratio == real.dedup_ratio
    assert predicted.saving_percent == real.saving_percent


def test_all_zeros_written_and_sparse(tmp_path: Path) -> None:
    written = write_image(tmp_path / "zeros.img", bytes(64 * P))
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(64 * P)
    for image in (written, sparse):
        s = estimate_image(str(image)).statistics
        assert (s.zero_pages, s.mapped_pages, s.same_filled_pages, s.stored_pages) == (64, 0, 0, 0)
        assert (s.logical_bytes, s.saved_bytes, s.dedup_ratio) == (0, 0, None)
        assert_agrees(estimate_image(str(image)), imported(image, tmp_path))


def test_one_fill_word_takes_no_slot(tmp_path: Path) -> None:
    image = write_image(tmp_path / "fill.img", fill(0x0123_4567_89AB_CDEF) * 50)
    result = estimate_image(str(image))
    s = result.statistics
    assert (s.same_filled_pages, s.mapped_pages, s.stored_pages, s.zero_pages) == (50, 0, 0, 0)
    assert (s.logical_bytes, s.stored_bytes, s.saved_bytes) == (50 * P, 0, 50 * P)
    assert s.dedup_ratio is None  # nothing stored: stats.py's definition
    assert s.saving_percent == 100.0
    assert_agrees(result, imported(image, tmp_path))


def test_n_copies_of_k_pages(tmp_path: Path) -> None:
    k, n = 5, 7
    pages = rand_pages(k, seed=1)
    layout = [pages[i % k] for i in range(k * n)]  # interleaved, so copies are far apart
    image = write_image(tmp_path / "copies.img", b"".join(layout))
    result = estimate_image(str(image))
    s = result.statistics
    assert (s.mapped_pages, s.index_entries, s.stored_pages) == (35, 5, 5)
    assert (s.dedup_ratio, s.saved_bytes) == (7.0, 30 * P)
    assert_agrees(result, imported(image, tmp_path))


def test_more_copies_than_max_share(tmp_path: Path) -> None:
    a, b, c = rand_pages(3, seed=2)
    image = write_image(tmp_path / "shared.img", a * 1000 + b * 254 + c * 255)
    s = estimate_image(str(image)).statistics
    # ceil(1000 / 254) + 1 + 2 slots; three distinct contents, one index entry each
    assert (s.mapped_pages, s.index_entries, s.stored_pages) == (1509, 3, 4 + 1 + 2)
    assert_agrees(estimate_image(str(image)), imported(image, tmp_path))
    small = estimate_image(str(image), max_share=10)
    assert small.statistics.stored_pages == 100 + 26 + 26
    assert_agrees(small, imported(image, tmp_path, max_share=10))


def test_trailing_partial_page_counts_padded_with_zeros(tmp_path: Path) -> None:
    head = b"\x5a" * 100
    # page 0 is `head` padded with zeros in full; the image ends with the same 100 bytes.
    image = write_image(
        tmp_path / "partial.img", head + bytes(P - 100) + rand_pages(1, 3)[0] + head
    )
    result = estimate_image(str(image))
    s = result.statistics
    assert (result.image_bytes, s.size_bytes) == (2 * P + 100, 3 * P)
    assert (s.mapped_pages, s.index_entries, s.stored_pages, s.zero_pages) == (3, 2, 2, 0)
    assert_agrees(result, imported(image, tmp_path))
    zeros_tail = write_image(tmp_path / "tail.img", rand_pages(1, 4)[0] + bytes(10))
    s = estimate_image(str(zeros_tail)).statistics
    assert (s.mapped_pages, s.zero_pages) == (1, 1)


def test_unique_random_pages(tmp_path: Path) -> None:
    image = write_image(tmp_path / "unique.img", b"".join(rand_pages(300, seed=5)))
    result = estimate_image(str(image))
    s = result.statistics
    assert (s.mapped_pages, s.index_entries, s.stored_pages, s.dedup_ratio) == (300, 300, 300, 1.0)
    assert s.saved_bytes == 0
    assert_agrees(result, imported(image, tmp_path))


def test_holes_and_a_larger_device(tmp_path: Path) -> None:
    """A sparse file (its holes are skipped, not read) with data at unaligned offsets, in a
    device larger than the image."""
    a, b = rand_pages(2, seed=6)
    image = tmp_path / "holes.img"
    with image.open("wb") as f:
        f.truncate(3 << 20)
        for offset, data in [(5000, a[:10]), (1 << 20, a), ((2 << 20) + 1, b), ((3 << 20) - 7, a)]:
            f.seek(offset)
            f.write(data)
    size = 4 << 20
    result = estimate_image(str(image), size=size)
    s = result.statistics
    assert s.size_bytes == size and s.zero_pages == size // P - s.mapped_pages
    assert s.mapped_pages == 1 + 1 + 2 + 2  # each write's pages; the last runs past 3 MiB
    assert_agrees(result, imported(image, tmp_path, size=size))


def test_distinct_counter_merges_runs_exactly_within_its_bound(tmp_path: Path) -> None:
    rng = random.Random(7)
    keys = [rng.getrandbits(64) for _ in range(3000)] + [0, 2**64 - 1]
    added = [rng.choice(keys) for _ in range(20_000)]
    want = sorted(collections.Counter(added).values())
    for run_size, fan_in in [(16, 2), (100, 3), (5000, 64), (10**6, 64)]:
        counter = DistinctCounter(str(tmp_path), run_size=run_size, fan_in=fan_in, merge_block=7)
        for key in added:
            counter.add(key)
        assert sorted(counter.multiplicities()) == want
        assert counter.peak_held <= run_size
        spilled = len(added) // run_size  # full runs written as they filled
        merged = spilled >= fan_in  # then merged level by level into fewer, longer runs
        assert counter.runs_written > spilled if merged else counter.runs_written == spilled
    assert list(DistinctCounter(str(tmp_path)).multiplicities()) == []


def test_memory_does_not_grow_with_distinct_pages(tmp_path: Path) -> None:
    """Estimates of 2048 and of 8192 distinct pages, with runs of 256 fingerprints: the larger
    one's Python heap peak (tracemalloc) may not exceed the smaller one's by even 2 bytes a
    distinct page (a set of the fingerprints would take ~60), and neither held more than a run."""
    peaks = []
    for n in (2048, 8192):
        image = write_image(tmp_path / f"distinct-{n}.img", counted_pages(0, n))
        counter = DistinctCounter(str(tmp_path), run_size=256, fan_in=4, merge_block=64)
        tracemalloc.start()
        try:
            s = estimate_image(str(image), counter=counter).statistics
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert (s.mapped_pages, s.index_entries, s.stored_pages) == (n, n, n)
        assert counter.peak_held <= 256 and counter.runs_written >= n // 256
        image.unlink()
    assert peaks[1] - peaks[0] < 2 * (8192 - 2048), peaks


def test_filesystem_image_agrees_with_the_store(tmp_path: Path) -> None:
    image = ext4_image(tmp_path)
    code, out, err = run("estimate", str(image), "--json")
    assert code == 0, err
    predicted = json.loads(out)
    real = imported(image, tmp_path)
    for key in ("mapped_pages", "same_filled_pages", "zero_pages", "size_bytes"):
        assert predicted[key] == getattr(real, key), key
    assert abs(predicted["stored_pages"] - real.stored_pages) <= real.stored_pages / 100
    assert real.stored_pages < real.mapped_pages  # the image does hold duplicates
    # The metadata is a model of LMDB's pages (calibrated in dedupblk/estimate.py's docstring).
    assert abs(predicted["metadata_bytes"] / real.metadata_bytes - 1) < 0.25, (
        predicted["metadata_bytes"],
        real.metadata_bytes,
    )


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_table_json_and_errors(tmp_path: Path) -> None:
    a = rand_pages(1, seed=8)[0]
    image = write_image(tmp_path / "img", a * 3 + bytes(P) + fill(9))
    code, out, _ = run("estimate", str(image), "--json")
    record = json.loads(out)
    assert code == 0
    stats_keys = set(Statistics.__dataclass_fields__)
    assert set(record) == stats_keys | {"image", "image_bytes", "max_share"}
    assert all(isinstance(record[k], int) for k in (*COUNTS, "metadata_bytes", "saved_bytes"))
    assert (record["mapped_pages"], record["stored_pages"], record["zero_pages"]) == (3, 1, 1)
    assert record["dedup_ratio"] == 4.0  # three data pages and a fill over one slot
    code, out, _ = run("estimate", str(image))
    assert code == 0
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "12.0 KiB (75.0%)" in lines["saved"]
    assert lines["dedup ratio"].endswith("4.00")
    assert "16.0 KiB" in lines["logical"]
    for bad in (["--size", "4096"], ["--size", "20001"], ["--max-share", "256"]):
        code, _, err = run("estimate", str(image), *bad)
        assert code == 2 and err.startswith("dedupblk: bad"), err
    code, _, err = run("estimate", "/dev/null")
    assert code == 2 and "neither a regular file nor a block device" in err
    os.chmod(image, 0)
    if os.geteuid() != 0:  # root reads it anyway
        code, _, err = run("estimate", str(image))
        assert code == 1 and "Permission denied" in err


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 4096, 27 << 20, 3 << 29, 5 << 40)] == [
        "0 B",
        "1023 B",
        "4.00 KiB",
        "27.0 MiB",
        "1.50 GiB",
        "5.00 TiB",
    ]
