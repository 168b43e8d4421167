"""The power-cut verifier (tests/vm/guest/power_cut.py) without a VM: it passes a store that
kept its promise and names each way a store can break it (older data, another page's data,
unrecognised bytes, a store that does not open), so the VM test can fail."""

from __future__ import annotations

import itertools
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from dedupblk.store import PAGE_SIZE, open_store
from tests.vm.guest.power_cut import (
    BASELINE,
    FILL,
    FLUSH_EVERY,
    HOT,
    UNIQUE,
    ZERO_CONTENT,
    Content,
    LogError,
    Workload,
    _run_in_child,
    decode,
    expectations,
    page_bytes,
    read_log,
    verify,
    write,
)

SEED = 20261201
SIZE = 1 << 20  # 256 pages: a few hundred operations overwrite most of them
PAGES = SIZE // PAGE_SIZE
OPS = 1000  # not a flush point: the store's close flushes a window the log does not name


@pytest.fixture
def written(tmp_path: Path) -> tuple[str, str]:
    """A store the writer wrote ``OPS`` operations to and closed, and its log."""
    store, log = str(tmp_path / "store"), str(tmp_path / "log")
    assert write(store, log, SEED, SIZE, ops_limit=OPS) == OPS
    return store, log


def test_each_content_names_itself() -> None:
    contents: list[Content] = [(UNIQUE, 7, 3), (HOT, 2, 0), (FILL, 0xA5 << 56 | 7 << 8, 0)]
    for content in [*contents, ZERO_CONTENT]:
        assert decode(page_bytes(content, SEED), SEED) == content
    torn = bytearray(page_bytes((UNIQUE, 7, 3), SEED))
    torn[2000] ^= 1
    assert decode(bytes(torn), SEED) is None
    assert decode(page_bytes((UNIQUE, 7, 3), SEED + 1), SEED) is None  # another run's page
    assert decode(random.Random(1).randbytes(PAGE_SIZE), SEED) is None


def test_the_operations_are_a_function_of_the_seed() -> None:
    def first(seed: int, count: int) -> list[Any]:
        ops = Workload(seed, PAGES).ops()
        return [next(ops) for _ in range(count)]

    ops = first(SEED, 800)
    assert ops == first(SEED, 800)
    assert ops != first(SEED + 1, 800)
    prefill = [op for op in ops if op.verb == "write" and op.index < 4]
    assert sorted(op.first + k for op in prefill for k in range(len(op.contents))) == list(
        range(PAGES)
    )
    flushes = [op.index for op in ops if op.flush_after]
    assert flushes[0] == 3  # the prefill's end
    gaps = {b - a for a, b in itertools.pairwise(flushes[1:])}
    assert gaps and all(FLUSH_EVERY[0] <= gap <= FLUSH_EVERY[1] for gap in gaps)
    verbs = {op.verb for op in ops} | {op.contents[0][0] for op in ops}
    assert verbs >= {"write", "trim", UNIQUE, HOT, FILL, ZERO_CONTENT[0]}


def test_a_store_that_kept_its_promise_passes(written: tuple[str, str]) -> None:
    _, log = written
    result = verify(log)
    assert result["check"]["problems"] == []
    assert result["check_after"]["problems"] == []
    read = result["read"]
    assert read["opened"]
    assert read["good"] == PAGES
    assert read["older"] == read["other_page"] == read["unrecognised"] == read["unreadable"] == 0
    # The close flushed operations after the last logged flush: they read as such (conclusive).
    assert read["post_flush"] > 0
    assert result["last_flush"] < OPS - 1 < result["window_end"]


def _pick(expected: Any, want: str, start: int) -> tuple[int, Content]:
    """A page from ``start`` on and content it must not read as: ``older`` (it held it before
    the flush) or ``other`` (only other pages ever held it)."""
    for page in range(start, PAGES):
        for content in expected.anywhere:
            if content in expected.accepted[page] or content[0] != UNIQUE:
                continue
            if (want == "older") == (content in expected.before[page]):
                return page, content
    raise AssertionError(f"no page with {want} content")


def test_older_data_and_another_pages_data_are_found(written: tuple[str, str]) -> None:
    store_path, log = written
    expected = expectations(SEED, PAGES, read_log(log)[1][-1])
    older_page, older = _pick(expected, "older", 0)
    other_page, other = _pick(expected, "other", older_page + 1)
    garbage_page = next(p for p in range(PAGES) if p not in (older_page, other_page))
    with open_store(store_path) as store:
        store.write(older_page * PAGE_SIZE, page_bytes(older, SEED))
        store.write(other_page * PAGE_SIZE, page_bytes(other, SEED))
        store.write(garbage_page * PAGE_SIZE, random.Random(2).randbytes(PAGE_SIZE))
    read = verify(log)["read"]
    assert (read["older"], read["other_page"], read["unrecognised"]) == (1, 1, 1)
    assert read["good"] == PAGES - 3
    (shown_older,) = read["examples"]["older"]
    assert shown_older["page"] == older_page
    assert shown_older["op"] == expected.before[older_page][older]
    (shown_other,) = read["examples"]["other_page"]
    assert (shown_other["page"], shown_other["op"]) == (other_page, expected.anywhere[other][0])


def test_a_store_that_does_not_open_is_reported(written: tuple[str, str]) -> None:
    store_path, log = written
    with open(os.path.join(store_path, "meta", "data.mdb"), "r+b") as data:
        data.write(random.Random(3).randbytes(2 * PAGE_SIZE))  # both LMDB meta pages
    result = verify(log)
    assert not result["read"]["opened"]
    assert "error" in result["read"]
    assert "error" in result["check"]


def test_the_log_names_what_was_flushed(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text('H {"version": 1, "seed": 5, "size": 1048576, "store": "s", "backend": null}\n')
    with pytest.raises(LogError, match="no flush record"):
        read_log(str(log))
    first_flush = next(op.index for op in Workload(5, PAGES).ops() if op.flush_after)
    with log.open("a") as more:
        more.write(f"F {BASELINE}\nF {first_flush}\nF 99 ")  # the last one torn by the cut
    assert read_log(str(log))[1:] == ([BASELINE, first_flush], None)
    with log.open("a") as more:
        more.write("9.50\n")  # what the torn record was meant to say
    assert read_log(str(log))[2] == 9.5
    with pytest.raises(LogError, match="no flush point"):
        expectations(5, PAGES, first_flush + 1)
    with pytest.raises(LogError, match="never started"):
        read_log(str(tmp_path / "absent"))


def test_a_phase_that_dies_or_raises_is_reported() -> None:
    def die() -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def fail() -> dict[str, Any]:
        raise RuntimeError("MDB_CORRUPTED")

    assert _run_in_child(lambda: {"problems": []}) == {"problems": []}
    assert _run_in_child(die)["error"] == "the process died of SIGKILL"
    assert _run_in_child(fail)["error"] == "RuntimeError: MDB_CORRUPTED"
