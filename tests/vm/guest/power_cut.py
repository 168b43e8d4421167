"""Guest side of the power-cut test: write through the store until the VM is killed, then verify.

    python tests/vm/guest/power_cut.py write --log /export/log --seed N [--size-mb 16]
        [--store /scratch/store] [--backend inside|file] [--writeback aggressive|default]
    python tests/vm/guest/power_cut.py verify --log /export/log

The promise under test (issue 12): a block device may lose writes that were never
flushed, and nothing else. After a cut at any moment, a store on a disk filesystem opens,
``check`` is clean, and every page reads as its last flushed content or as a write issued after
that flush; never older data, never another page's.

``write`` (boot 1, the store on the guest's ext4 /scratch, qemu killed at a random moment by the
host) creates the store, syncs it, writes every page once and flushes, prints `MARKER` (the
host's kill clock starts), and then applies an endless stream of operations through the public
API: unique pages, duplicates of a small hot set, copies of another page's content, same-filled
pages, zero pages, trims of 1 to 4 pages, multi-page writes, half of them aimed at a busy eighth
of the device so that pages are overwritten often, a commit every few operations and a flush
every ~200. The stream is a function of the seed alone (`Workload`), so nothing but the flushes
has to be logged: after each ``flush()`` returns, the index of the last operation it covers is
appended to the log (on the host, over 9p) and fsync'd.

``verify`` (boot 2, same disk image) replays the stream from the seed in the log's header up to
the last logged flush F and through the window of operations after it, up to the next flush
point: none beyond it can have been issued, because the writer logs a flush before it goes on.
Every page may then read as its content as of F, or as the content of any window operation that
touched it (zeros for a trim or a zero page). Each page's content names itself (`page_bytes`), so
a bad page is told apart: *older data* (content this page held before F), *another page's data*
(content only other pages held), or *unrecognised* (garbage, a torn slot). Pages that read as
window content count how much written after F reached the disk: with none, the cycle could not
have failed and is *inconclusive*. The store is checked (read-only, as the cut left it), opened
for writing (the way a server reopens it) and read page by page, then checked again; each step
runs in a child process, so an LMDB assertion that aborts is reported, not fatal. The result is
one line, `RESULT_PREFIX` and JSON, which testbed/power_cut.py reads.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dedupblk.store import PAGE_SIZE, Store, check_store, create_store, open_store

MARKER = "power-cut: writing"  # printed once the writer starts writing: the host's kill clock
RESULT_PREFIX = "RESULT "
LOG_VERSION = 1
BASELINE = -1  # the flush record of the freshly created (and synced) store: every page zero

FLUSH_EVERY = (150, 250)  # operations between two flushes, drawn uniformly
COMMIT_EVERY = (4, 24)  # operations between two explicit commits
PREFILL_PAGES = 64  # pages per write of the prefill
# Seconds the writer pauses after each operation, as a client waiting for its I/O does: a window
# between two flushes then lasts at least ~0.4 s however fast the guest runs (an unpaced writer
# did 600 ops/s on an idle machine, and 40 on a busy one), and the store's group-commit thread
# gets its lock.
PACE = 0.002
HOT_SET = 16  # distinct contents the duplicates are drawn from
COMMON_FILL_WORDS = (0xFFFF_FFFF_FFFF_FFFF, 0x0101_0101_0101_0101, 0x0000_0000_DEAD_BEEF)
EXAMPLES = 5  # bad pages shown per kind
PHASE_TIMEOUT = 600.0  # seconds a check or the read pass may take before it counts as hung

# Content ids: (kind, a, b). A page's bytes name their id (see `page_bytes` and `decode`).
UNIQUE, HOT, FILL, ZERO = 0, 1, 2, 3
Content = tuple[int, int, int]
ZERO_CONTENT: Content = (ZERO, 0, 0)
_MAGIC = {UNIQUE: b"PCUTuniq", HOT: b"PCUThot_"}
_KIND_OF_MAGIC = {magic: kind for kind, magic in _MAGIC.items()}
_HEAD = struct.Struct("<8sQQQ")  # magic, seed, a (op or hot index), b (the op's k-th page)
_TAGGED_FILL = 0xA5 << 56  # a fill word of one op's own: 0xA5, then the op's index
ZERO_PAGE = bytes(PAGE_SIZE)


def page_bytes(content: Content, seed: int) -> bytes:
    """The 4 KiB a content id stands for: a head naming it and bytes derived from the head."""
    kind, a, b = content
    if kind == ZERO:
        return ZERO_PAGE
    if kind == FILL:
        return a.to_bytes(8, "little") * (PAGE_SIZE // 8)
    head = _HEAD.pack(_MAGIC[kind], seed, a, b)
    return head + hashlib.shake_128(head).digest(PAGE_SIZE - len(head))


def decode(data: bytes, seed: int) -> Content | None:
    """The content id ``data`` is exactly the bytes of, or None (garbage, a torn page)."""
    if data == ZERO_PAGE:
        return ZERO_CONTENT
    word = data[:8]
    if data == word * (PAGE_SIZE // 8):
        return (FILL, int.from_bytes(word, "little"), 0)
    magic, data_seed, a, b = _HEAD.unpack_from(data)
    kind = _KIND_OF_MAGIC.get(magic)
    if kind is None or data_seed != seed:
        return None
    content = (kind, a, b)
    return content if page_bytes(content, seed) == data else None


def describe(content: Content | None) -> str:
    if content is None:
        return "unrecognised bytes"
    kind, a, b = content
    if kind == UNIQUE:
        return f"unique #{b} of op {a}"
    if kind == HOT:
        return f"hot content {a}"
    if kind == FILL:
        return f"fill {a:#018x}"
    return "zeros"


@dataclass(frozen=True)
class Op:
    """One request: ``contents[k]`` goes to page ``first + k``; a trim zeroes them."""

    index: int
    verb: str  # "write" or "trim"
    first: int
    contents: tuple[Content, ...]
    flush_after: bool  # the writer flushes (and logs ``index``) right after this op
    commit_after: bool = False  # the writer commits right after this op (no sync)


class Workload:
    """The operations of one seed, in order; `current` is each page's content after the last
    operation yielded (a copy reads it).

    Between two flushes the writer commits every few operations (`COMMIT_EVERY`), as the ublk
    server commits once per pass: each commit is metadata that writeback may carry to the disk
    before the cut. (The store's group-commit timer alone seldom gets the store's lock from a
    writer that never pauses: under TCG it committed about once a second.)

    The first `prefill_ops` write every page once with unique data, 64 pages at a time, and
    end with a flush: a store that has been used. Its metadata file (allocated at create as
    unwritten extents) and its slots are then written blocks, which the random phase after it
    overwrites in place; on a fresh store, most writes after a flush would go to blocks whose
    allocation only the next journal commit (every 5 s on ext4) or flush makes durable, and a
    cut would rarely find any of them on the disk.
    """

    def __init__(self, seed: int, pages: int) -> None:
        self.seed = seed
        self.pages = pages
        self.busy = max(1, pages // 8)
        self.prefill_ops = -(-pages // PREFILL_PAGES)
        self.current: list[Content] = [ZERO_CONTENT] * pages
        self._rng = random.Random(seed)

    def ops(self) -> Iterator[Op]:
        rng = self._rng
        for index in range(self.prefill_ops):
            first = index * PREFILL_PAGES
            count = min(PREFILL_PAGES, self.pages - first)
            contents = tuple((UNIQUE, index, k) for k in range(count))
            self.current[first : first + count] = contents
            yield Op(index, "write", first, contents, index == self.prefill_ops - 1)
        next_flush = self.prefill_ops + rng.randint(*FLUSH_EVERY) - 1
        next_commit = self.prefill_ops + rng.randint(*COMMIT_EVERY) - 1
        for index in itertools.count(self.prefill_ops):
            verb, first, contents = self._draw(index)
            flush, commit = index == next_flush, index == next_commit
            if flush:
                next_flush += rng.randint(*FLUSH_EVERY)
            if commit:
                next_commit += rng.randint(*COMMIT_EVERY)
            self.current[first : first + len(contents)] = contents
            yield Op(index, verb, first, contents, flush, commit)

    def _draw(self, index: int) -> tuple[str, int, tuple[Content, ...]]:
        rng = self._rng
        first = rng.randrange(self.busy) if rng.random() < 0.5 else rng.randrange(self.pages)
        room = self.pages - first
        choice = rng.random()
        if choice < 0.30:  # a unique page
            return "write", first, ((UNIQUE, index, 0),)
        if choice < 0.45:  # a multi-page write of unique pages
            count = min(room, rng.randint(2, 8))
            return "write", first, tuple((UNIQUE, index, k) for k in range(count))
        if choice < 0.60:  # a duplicate of the hot set
            return "write", first, ((HOT, rng.randrange(HOT_SET), 0),)
        if choice < 0.66:  # a copy of what another page holds now (often a unique page)
            return "write", first, (self.current[rng.randrange(self.pages)],)
        if choice < 0.74:  # same-filled: a common word or one of this op's own
            if rng.random() < 0.5:
                word = rng.choice(COMMON_FILL_WORDS)
            else:
                word = _TAGGED_FILL | (index & 0xFFFF_FFFF) << 8
            return "write", first, ((FILL, word, 0),)
        if choice < 0.82:  # zero pages written as data
            return "write", first, (ZERO_CONTENT,) * min(room, rng.randint(1, 2))
        return "trim", first, (ZERO_CONTENT,) * min(room, rng.randint(1, 4))


def apply(store: Store, op: Op, seed: int) -> None:
    offset = op.first * PAGE_SIZE
    if op.verb == "trim":
        store.trim(offset, len(op.contents) * PAGE_SIZE)
    else:
        store.write(offset, b"".join(page_bytes(c, seed) for c in op.contents))


# -- write ---------------------------------------------------------------------------------------


def set_writeback(mode: str) -> None:
    """``aggressive``: dirty pages are written back 50 ms after they were dirtied, so commits
    after the last flush reach the disk (in some order) before the cut; ``default``: as booted."""
    if mode == "aggressive":
        for name in ("dirty_writeback_centisecs", "dirty_expire_centisecs"):
            with open(f"/proc/sys/vm/{name}", "w") as knob:
                knob.write("5\n")
    settings = {
        name: open(f"/proc/sys/vm/{name}").read().strip()  # noqa: SIM115 -- one-line reads
        for name in ("dirty_writeback_centisecs", "dirty_expire_centisecs")
    }
    print(f"power-cut: writeback {mode}: {settings}", flush=True)


def _append(log: int, line: str) -> None:
    os.write(log, line.encode() + b"\n")
    os.fsync(log)


def write(
    store_path: str,
    log_path: str,
    seed: int,
    size: int,
    *,
    backend: str | None = None,
    ops_limit: int | None = None,
    on_start: Callable[[], None] = lambda: None,
) -> int:
    """Create a store at ``store_path`` and write the seed's operations until killed (or, for a
    test without a cut, until ``ops_limit`` operations were applied; the store is then closed,
    which flushes). ``on_start`` is called once the prefill is flushed. Returns the number of
    operations applied."""
    create_store(store_path, size, backend=backend)
    os.sync()  # the empty store is the baseline: durable before the first record says so
    header = {
        "version": LOG_VERSION,
        "seed": seed,
        "size": size,
        "store": store_path,
        "backend": backend,
    }
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    applied = 0
    try:
        _append(log, "H " + json.dumps(header, sort_keys=True))
        _append(log, f"F {BASELINE}")
        workload = Workload(seed, size // PAGE_SIZE)
        started = time.monotonic()
        writing: float | None = None  # when on_start was called
        flushes = 0
        with open_store(store_path) as store:
            for op in workload.ops():
                if ops_limit is not None and op.index >= ops_limit:
                    break
                if op.index == workload.prefill_ops:
                    print(f"power-cut: prefilled in {time.monotonic() - started:.1f} s", flush=True)
                    on_start()
                    writing = time.monotonic()
                apply(store, op, seed)
                applied += 1
                if writing is not None:
                    time.sleep(PACE)
                if op.commit_after and not op.flush_after:
                    store.commit()
                if op.flush_after:
                    store.flush()
                    # When, after the marker: shows how long before the cut the last flush was.
                    after = "" if writing is None else f" {time.monotonic() - writing:.2f}"
                    _append(log, f"F {op.index}{after}")
                    flushes += 1
                    if flushes % 10 == 0:
                        rate = applied / (time.monotonic() - started)
                        print(f"power-cut: op {op.index} flushed ({rate:.0f} ops/s)", flush=True)
    finally:
        os.close(log)
    return applied


# -- verify --------------------------------------------------------------------------------------


class LogError(Exception):
    """The log cannot say what was flushed: a harness failure, not a verdict on the store."""


def read_log(log_path: str) -> tuple[dict[str, Any], list[int], float | None]:
    """The header, the flushed op indices and the seconds after the marker at which the last
    flush returned (None: before it). A last line without its newline (the cut came while it
    was being appended) is ignored: its fsync never returned."""
    try:
        with open(log_path) as log:
            text = log.read()
    except FileNotFoundError:
        raise LogError(f"no log at {log_path}: the writer never started") from None
    lines = text.split("\n")[:-1]
    if not lines or not lines[0].startswith("H "):
        raise LogError(f"{log_path} has no header line")
    header: dict[str, Any] = json.loads(lines[0][2:])
    if header.get("version") != LOG_VERSION:
        raise LogError(f"{log_path}: log version {header.get('version')}, not {LOG_VERSION}")
    records = [line.split()[1:] for line in lines[1:] if line.startswith("F ")]
    if not records:
        raise LogError(f"{log_path} has no flush record, not even the baseline")
    last_time = float(records[-1][1]) if len(records[-1]) > 1 else None
    return header, [int(record[0]) for record in records], last_time


@dataclass
class Expectations:
    """What each page may read as after a cut, and what it held before, to name a bad read."""

    last_flush: int  # index of the last op a logged flush covers (BASELINE: none)
    window_end: int  # the next flush point: the last op that can have been issued
    as_of_flush: list[Content]
    accepted: list[set[Content]]  # as_of_flush plus every window op's content, per page
    before: list[dict[Content, int]]  # contents a page held up to the flush -> last op index
    anywhere: dict[Content, tuple[int, int]]  # content -> (last op index, page) that wrote it


def expectations(seed: int, pages: int, last_flush: int) -> Expectations:
    """Replay the seed's operations through ``last_flush`` and the window after it."""
    before: list[dict[Content, int]] = [{ZERO_CONTENT: BASELINE} for _ in range(pages)]
    anywhere: dict[Content, tuple[int, int]] = {}
    as_of: list[Content] = [ZERO_CONTENT] * pages
    accepted: list[set[Content]] = []
    for op in Workload(seed, pages).ops():
        in_window = op.index > last_flush
        if in_window and not accepted:
            accepted = [{content} for content in as_of]
        for page, content in enumerate(op.contents, start=op.first):
            anywhere[content] = (op.index, page)
            if in_window:
                accepted[page].add(content)
            else:
                before[page][content] = op.index
                as_of[page] = content
        if op.index == last_flush and not op.flush_after:
            raise LogError(f"op {last_flush} is logged as flushed but is no flush point")
        if in_window and op.flush_after:
            return Expectations(last_flush, op.index, as_of, accepted, before, anywhere)
    raise AssertionError("the stream of operations is endless")


def _name(exc: BaseException) -> str:
    """``StoreError``, ``lmdb.CorruptedError``, ``struct.error``: enough to tell them apart."""
    kind = type(exc)
    if kind.__module__ in ("builtins", "dedupblk.errors"):
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _run_in_child(phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``phase`` in a forked child and return its dict, or ``{"error": ...}`` if it raised,
    died (an LMDB assertion aborts the process) or hung; the child's stderr tail comes along."""
    with tempfile.TemporaryFile() as stderr:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(reader)
            os.dup2(stderr.fileno(), 2)
            try:
                out = phase()
            except BaseException as exc:  # every failure is part of the verdict
                out = {"error": f"{_name(exc)}: {exc}", "traceback": traceback.format_exc()}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(writer, data) :]
            os._exit(0)
        os.close(writer)
        chunks: list[bytes] = []
        deadline = time.monotonic() + PHASE_TIMEOUT
        hung = False
        while True:
            ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                hung = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(reader, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(reader)
        _, status = os.waitpid(pid, 0)
        stderr.seek(0)
        err = stderr.read().decode(errors="replace")[-2000:]
    if hung:
        return {"error": f"hung: killed after {PHASE_TIMEOUT:g} s", "stderr": err}
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"error": f"the process died of {name}", "stderr": err}
    try:
        result: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        return {
            "error": f"no result (exit status {os.waitstatus_to_exitcode(status)})",
            "stderr": err,
        }
    if "error" in result:
        result["stderr"] = err
    return result


def check_phase(store_path: str) -> dict[str, Any]:
    result = check_store(store_path)
    return {"problems": [f"{p.check}: {p.message}" for p in result.problems]}


def read_phase(store_path: str, seed: int, expected: Expectations) -> dict[str, Any]:
    """Open the store for writing, as a server does after a cut, and read every page."""
    counts = dict.fromkeys(
        ("good", "post_flush", "older", "other_page", "unrecognised", "unreadable"), 0
    )
    examples: dict[str, list[dict[str, Any]]] = {}

    def example(kind: str, entry: dict[str, Any]) -> None:
        counts[kind] += 1
        shown = examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(entry)

    try:
        store = open_store(store_path)
    except Exception as exc:  # a store that does not open is the verdict
        return {"opened": False, "error": f"{_name(exc)}: {exc}"}
    with store:
        for page in range(len(expected.as_of_flush)):
            should = describe(expected.as_of_flush[page])
            try:
                data = store.read(page * PAGE_SIZE, PAGE_SIZE)
            except Exception as exc:  # counted; the next page is tried
                example("unreadable", {"page": page, "error": f"{_name(exc)}: {exc}"})
                continue
            content = decode(data, seed)
            if content is not None and content in expected.accepted[page]:
                counts["good"] += 1
                counts["post_flush"] += content != expected.as_of_flush[page]
                continue
            entry: dict[str, Any] = {"page": page, "read": describe(content), "flushed": should}
            if content is not None and content in expected.before[page]:
                entry["op"] = expected.before[page][content]
                example("older", entry)
            elif content is not None and content in expected.anywhere:
                entry["op"], entry["of_page"] = expected.anywhere[content]
                example("other_page", entry)
            else:
                example("unrecognised", entry)
    return {"opened": True, "pages": len(expected.as_of_flush), **counts, "examples": examples}


def verify(log_path: str) -> dict[str, Any]:
    """Everything boot 2 finds, as one JSON-able dict (see the module docstring)."""
    header, flushed, last_time = read_log(log_path)
    seed, store_path = int(header["seed"]), str(header["store"])
    expected = expectations(seed, int(header["size"]) // PAGE_SIZE, flushed[-1])
    result: dict[str, Any] = {
        "seed": seed,
        "flushes": len(flushed) - 1,
        "last_flush": expected.last_flush,
        "last_flush_seconds": last_time,
        "window_end": expected.window_end,
    }
    phases: dict[str, Callable[[], dict[str, Any]]] = {
        "check": lambda: check_phase(store_path),
        "read": lambda: read_phase(store_path, seed, expected),
        "check_after": lambda: check_phase(store_path),
    }
    for name, phase in phases.items():
        started = time.monotonic()
        result[name] = _run_in_child(phase)
        result[name]["seconds"] = round(time.monotonic() - started, 1)
    return result


def print_report(result: dict[str, Any]) -> None:
    print(
        f"power-cut: last flush covers op {result['last_flush']} ({result['flushes']} flushes); "
        f"ops up to {result['window_end']} may have been issued after it"
    )
    for phase in ("check", "check_after"):
        found = result[phase]
        if "error" in found:
            print(f"{phase}: FAILED: {found['error']}\n{found.get('stderr', '')}")
        else:
            print(f"{phase}: {len(found['problems'])} problems ({found['seconds']} s)")
            for problem in found["problems"][:10]:
                print(f"  {problem}")
    read = result["read"]
    if not read.get("opened"):
        print(f"open: FAILED: {read.get('error')}\n{read.get('stderr', '')}")
        return
    print(
        f"read: {read['pages']} pages, {read['good']} good ({read['post_flush']} as written after "
        f"the flush), {read['older']} older data, {read['other_page']} another page's data, "
        f"{read['unrecognised']} unrecognised, {read['unreadable']} unreadable "
        f"({read['seconds']} s)"
    )
    for kind, shown in read["examples"].items():
        for entry in shown:
            print(f"  {kind}: {json.dumps(entry)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    writer = modes.add_parser("write", help="create the store and write until killed")
    writer.add_argument("--log", required=True)
    writer.add_argument("--seed", type=int, required=True)
    writer.add_argument("--size-mb", type=int, default=16)
    writer.add_argument("--store", default="/scratch/store")
    writer.add_argument(
        "--backend",
        choices=("inside", "file"),
        default="inside",
        help="the slots in the store directory (default) or in a file beside it",
    )
    writer.add_argument("--writeback", choices=("aggressive", "default"), default="aggressive")
    writer.add_argument("--ops", type=int, help="stop after this many operations (no cut)")
    verifier = modes.add_parser("verify", help="check the store against the log")
    verifier.add_argument("--log", required=True)
    args = parser.parse_args()
    if args.mode == "write":
        set_writeback(args.writeback)
        backend = args.store.rstrip("/") + ".slots" if args.backend == "file" else None
        applied = write(
            args.store,
            args.log,
            args.seed,
            args.size_mb << 20,
            backend=backend,
            ops_limit=args.ops,
            on_start=lambda: print(MARKER, flush=True),
        )
        print(f"power-cut: stopped after {applied} ops without a cut")
        return 0
    try:
        result = verify(args.log)
    except LogError as exc:
        print(f"{RESULT_PREFIX}{json.dumps({'log_error': str(exc)})}")
        return 2
    print_report(result)
    print(f"{RESULT_PREFIX}{json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
