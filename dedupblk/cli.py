"""The ``dedupblk`` command: parse, call the store or a frontend, format.

Errors are translated in one place (`_Group.invoke`): a `DedupblkError` becomes one line on
stderr and its exit code, and so does a failed write to stdout (a full disk, a closed pipe: see
`_OutputFailed`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, Final

import click
from click.core import ParameterSource

from . import bench as bench_module
from .counters import parse_address
from .errors import DedupblkError, InvalidRequest
from .runtime import read_counters
from .sizes import format_size, parse_size
from .store import PAGE_SIZE, check_store, create_store, open_store, read_statistics
from .store.check import describe_range
from .store.create import META_PREALLOC_PER_PAGE
from .store.format import DEFAULT_MAX_SHARE, FINGERPRINT_NAMES, FORMAT_VERSION
from .ublk.abi import MAX_NR_QUEUES, MAX_QUEUE_DEPTH
from .usage import describe_usage, served_record

# `dump` reads and writes this much at a time: its memory stays bounded whatever LENGTH is.
DUMP_CHUNK: Final = 1 << 20


class _OutputFailed(Exception):
    """Writing to stdout failed (the OSError is chained): its reader went away or its file is
    full. Raised by `_echo` and `_write_stdout`, reported by `_Group.invoke`."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            _flush_stdout()
        except DedupblkError as exc:
            click.echo(f"dedupblk: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except _OutputFailed as exc:
            # What is left in stdout's buffer would fail again when Python flushes it at exit.
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
            click.echo(f"dedupblk: cannot write to stdout: {reason}", err=True)
            ctx.exit(1)
        return result


def _echo(text: str) -> None:
    """`click.echo` to stdout; a failure to write is `_OutputFailed`."""
    try:
        click.echo(text)
    except OSError as exc:
        raise _OutputFailed from exc


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
    except OSError as exc:
        raise _OutputFailed from exc


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise _OutputFailed from exc


class SizeType(click.ParamType[int, Any]):
    """Bytes, with an optional K/M/G/T suffix (binary units)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except InvalidRequest as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()
# `create` and `estimate` take the same bound (an estimate predicts a store made with it).
MAX_SHARE_OPTION = click.option(
    "--max-share",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_SHARE,
    show_default=True,
    help="Most pages that may share one slot.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dedupblk")
@click.option("-v", "--verbose", is_flag=True, help="Log progress (e.g. a server's counters).")
def main(verbose: bool) -> None:
    """A deduplicating block device: identical 4 KiB pages are stored once."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="dedupblk: %(message)s"
    )


@main.command()
@click.argument("store", type=click.Path())
@click.option("--size", type=SIZE, required=True, help="Device size, e.g. 4G (multiple of 4K).")
@click.option("--backend", type=click.Path(), help="File or block device for the slots.")
@click.option("--backend-size", type=SIZE, help="Capacity of a new backend file.")
@click.option("--max-index-entries", type=click.IntRange(min=1), help="Bound the dedup index.")
@MAX_SHARE_OPTION
@click.option(
    "--preallocate",
    is_flag=True,
    help="Write the store's files in full now, never punch them (for swap).",
)
@click.option(
    "--meta-size",
    type=SIZE,
    help=f"With --preallocate: metadata file size (default {META_PREALLOC_PER_PAGE} bytes a page).",
)
@click.option(
    "--reuse-backend",
    is_flag=True,
    help="Take over a backend that holds another store's slots (they are lost).",
)
@click.option(
    "--overwrite-backend",
    is_flag=True,
    help="Take over a backend that holds anything else (a filesystem, a file's data: lost).",
)
def create(
    store: str,
    size: int,
    backend: str | None,
    backend_size: int | None,
    max_index_entries: int | None,
    max_share: int,
    preallocate: bool,
    meta_size: int | None,
    reuse_backend: bool,
    overwrite_backend: bool,
) -> None:
    """Create an empty store of SIZE bytes in the new or empty directory STORE.

    For swap: STORE on ramfs, --backend a block device of its own (else a file on a disk mounted
    lazytime), --preallocate (see README, "Running as swap").
    """
    create_store(
        store,
        size,
        backend=backend,
        backend_size=backend_size,
        max_index_entries=max_index_entries,
        max_share=max_share,
        preallocate=preallocate,
        meta_size=meta_size,
        reuse_backend=reuse_backend,
        overwrite_backend=overwrite_backend,
    )
    _echo(f"created {store}: {size} bytes" + (", preallocated" if preallocate else ""))
    config, usage = read_statistics(store)
    slots = usage.capacity_bytes // PAGE_SIZE
    if slots < config.pages:
        click.echo(
            f"dedupblk: warning: the backend holds {slots} slots "
            f"({format_size(usage.capacity_bytes)}); the device has {config.pages} pages: "
            f"writes of more than {slots} distinct pages will fail with ENOSPC",
            err=True,
        )


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(store: str, as_json: bool) -> None:
    """Show a store's format and configuration."""
    config, _ = read_statistics(store)
    record = {
        "format_version": config.format_version,
        "size_bytes": config.size,
        "page_size": config.page_size,
        "fingerprint": FINGERPRINT_NAMES.get(config.fingerprint, f"unknown ({config.fingerprint})"),
        "backend": config.backend or "(store)/slots",
        "slot_capacity": config.slot_capacity - 1,
        "max_index_entries": config.max_index_entries or None,
        "max_share": config.max_share,
        "uuid": config.uuid.hex(),
    }
    _print(record, as_json)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (raw integers): --format json.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["human", "json", "prometheus"]),
    help="human (the default), json, or prometheus (for node_exporter's textfile collector).",
)
def stats(store: str, as_json: bool, output_format: str | None) -> None:
    """Show usage; works while another process serves the store.

    \b
    logical    the bytes of the device's pages that are not zeros (in
               slots, or kept inline as same-filled pages)
    stored     the bytes of the slots in use ("used"; use% is stored
               over the capacity, the backend's slots)
    saved      logical minus stored; saving% is saved over logical
    ratio      logical over stored (the dedup ratio)
    zero pages read as zeros, take nothing, count in neither

    While a server runs, its request and error counters are shown too. The serving process
    writes them every 2 seconds to a counters file beside its record in the registry of served
    stores (/run/dedupblk-served for root; else served/ in $XDG_RUNTIME_DIR/dedupblk or
    /tmp/dedupblk-UID), which stats reads while that process lives: run stats as the server's
    user.
    """
    if as_json and output_format not in (None, "json"):
        raise InvalidRequest(f"--json and --format {output_format}: give one")
    shown = "json" if as_json else output_format or "human"
    _, statistics = read_statistics(store)
    counters = read_counters(store)
    if shown == "prometheus":
        from .metrics import exposition  # noqa: PLC0415  (prometheus_client loads for this)

        _echo(exposition(store, statistics, counters).rstrip("\n"))
    elif shown == "json":
        record: dict[str, Any] = asdict(statistics)
        if counters is not None:
            record["served"] = served_record(counters)
        _echo(json.dumps(record, indent=2))
    else:
        for line in describe_usage(statistics, counters):
            _echo(line)


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--size", type=SIZE, help="Device size (default: the image's, rounded up to 4K).")
@MAX_SHARE_OPTION
@click.option(
    "--temp-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Where sorted fingerprints go, 8 bytes a data page (default: TMPDIR).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (raw integers).")
def estimate(
    image: str, size: int | None, max_share: int, temp_dir: str | None, as_json: bool
) -> None:
    """What a store would hold if IMAGE (a file or block device) were imported into it.

    Reads IMAGE once, in bounded memory, and prints the `stats` the store would show: pages,
    zero and same-filled pages, stored pages, savings and the metadata it would cost.
    """
    from .estimate import describe, estimate_image  # noqa: PLC0415  (loaded for this command)

    with _progress("reading", enabled=not as_json) as (progress, on_total):
        result = estimate_image(
            image,
            size=size,
            max_share=max_share,
            temp_dir=temp_dir,
            progress=progress,
            on_total=on_total,
        )
    if as_json:
        click.echo(json.dumps(result.record(), indent=2))
        return
    for line in describe(result):
        click.echo(line)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--repair", is_flag=True, help="Fix what can be fixed from the mappings.")
def check(store: str, as_json: bool, repair: bool) -> None:
    """Verify every invariant of STORE.

    Exit status: 0 clean (or repaired with no data lost), 1 problems found, 3 repaired but data
    was lost (those byte ranges now read as EIO), 4 the metadata file itself is damaged (no
    repair can rebuild from it).
    """
    with _progress("checking", enabled=not as_json) as (progress, on_total):
        result = check_store(store, repair=repair, progress=progress, on_total=on_total)
    lost = [describe_range(first, length) for first, length in result.lost]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "clean": not result.problems,
                    "repaired": result.repaired,
                    "checks": list(result.checks),
                    "problems": [asdict(p) for p in result.problems],
                    "lost": [{"offset": f, "length": n} for f, n in result.lost],
                    "unrepairable": result.unrepairable,
                },
                indent=2,
            )
        )
    else:
        for problem in result.problems:
            click.echo(f"{problem.check}: {problem.message}")
        if not result.problems:
            click.echo(f"clean: {len(result.checks)} checks passed ({', '.join(result.checks)})")
        elif result.unrepairable:
            click.echo("the metadata file itself is damaged: no repair can rebuild it")
        elif result.repaired:
            click.echo(f"repaired {len(result.problems)} problems; run check again to confirm")
        for text in lost:
            click.echo(f"data lost: {text} now read as EIO until written or trimmed")
    if result.unrepairable:
        sys.exit(4)
    if result.repaired and result.lost:
        sys.exit(3)
    if result.problems and not result.repaired:
        sys.exit(1)


@main.command()
@click.argument("store", type=click.Path())
def upgrade(store: str) -> None:
    """Convert STORE from format version 1 to the current version, in place.

    The slots stay where they are; the new metadata is built beside the old one and swapped in
    at the end, so a store interrupted at any moment opens as the old version or the new.
    """
    from .store.upgrade import upgrade_store  # noqa: PLC0415  (not in a server's locked memory)

    with _progress("upgrading", enabled=True) as (progress, on_total):
        result = upgrade_store(store, progress=progress, on_total=on_total)
    if result.from_version == FORMAT_VERSION:
        click.echo(f"{store} already has format version {FORMAT_VERSION}")
        return
    click.echo(
        f"upgraded {store} from format version {result.from_version} to {FORMAT_VERSION}: "
        f"{result.pages} pages, {result.slots} slots, {result.index_entries} index entries"
    )


@contextlib.contextmanager
def _progress(
    label: str, *, enabled: bool
) -> Iterator[tuple[Callable[[int], None] | None, Callable[[int], None] | None]]:
    """(progress, on_total) callbacks drawing a bar on a terminal's stderr, else (None, None)."""
    if not (enabled and sys.stderr.isatty()):
        yield None, None
        return
    bars: list[Any] = []

    def start(total: int) -> None:
        bars.append(click.progressbar(length=total, label=label, file=sys.stderr))
        bars[0].__enter__()

    def step(n: int) -> None:
        if bars:
            bars[0].update(n)

    try:
        yield step, start
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--frontend", type=click.Choice(["nbd", "ublk"]), default="nbd", show_default=True)
@click.option("--socket", "socket_path", type=click.Path(), help="nbd: Unix socket path.")
@click.option("--port", type=click.IntRange(1, 65535), help="nbd: serve TCP on this port.")
@click.option("--bind", help="nbd: TCP address (default localhost; others need TLS).")
@click.option("--readonly", is_flag=True, help="nbd: serve read-only.")
@click.option("--foreground", is_flag=True, help="nbd: stay in the foreground.")
@click.option(
    "--run",
    "run_command",
    metavar="CMD",
    help="nbd: run CMD with $uri set (nbdkit --run), then stop; exit with its status.",
)
@click.option(
    "--tls",
    type=click.Choice(["off", "on", "require"]),
    help="nbd: nbdkit --tls (default: require when certificates or a PSK file are given).",
)
@click.option("--tls-certificates", type=click.Path(), help="nbd: nbdkit --tls-certificates.")
@click.option("--tls-psk", type=click.Path(), help="nbd: nbdkit --tls-psk (user:hexkey lines).")
@click.option(
    "--tcp-without-tls-for-every-local-user",
    is_flag=True,
    help="nbd: serve --port on loopback without TLS, where every local user can read and write.",
)
@click.option(
    "--queues",
    type=click.IntRange(1, MAX_NR_QUEUES),
    default=1,
    show_default=True,
    help="ublk: hardware queues.",
)
@click.option(
    "--depth",
    type=click.IntRange(1, MAX_QUEUE_DEPTH),
    default=64,
    show_default=True,
    help="ublk: queue depth.",
)
@click.option("--dev-id", type=click.IntRange(min=0), help="ublk: device id (default: any).")
@click.option("--swap", is_flag=True, help="ublk: mkswap and swapon the device.")
@click.option("--swap-priority", type=int, help="ublk: swapon priority.")
@click.option(
    "--swap-discard/--no-swap-discard",
    default=None,
    help="ublk: swapon --discard, so freed swap clusters free their slots (on with --swap).",
)
@click.option(
    "--swap-placement-may-hang",
    is_flag=True,
    help="ublk: with --swap, accept slots in a file or metadata on a disk (can hang the machine).",
)
@click.option("--recover", type=click.IntRange(min=0), help="ublk: reattach to this device id.")
@click.option(
    "--metrics",
    metavar="[ADDR:]PORT",
    help="Serve Prometheus metrics over HTTP (ADDR default 127.0.0.1; nbd: from nbdkit's process).",
)
@click.pass_context
def serve(ctx: click.Context, /, store: str, frontend: str, **options: Any) -> None:
    """Serve STORE as a block device over NBD (nbdkit) or ublk.

    With --metrics, http://ADDR:PORT/metrics answers in Prometheus' text format: the store's
    gauges (dedupblk_logical_bytes, dedupblk_stored_bytes, ...), dedupblk_requests_total and
    dedupblk_request_errors_total by op, and the dedupblk_commit_seconds and
    dedupblk_flush_seconds histograms. `dedupblk stats --format prometheus` prints the gauges.
    """
    _refuse_other_frontend_options(ctx, frontend)
    metrics = None
    if options["metrics"] is not None:
        metrics = parse_address(options["metrics"])
    if frontend == "nbd":
        from .nbd import launcher  # noqa: PLC0415  (frontends load only when served)

        code = launcher.serve(
            store,
            socket=options["socket_path"],
            port=options["port"],
            bind=options["bind"],
            readonly=options["readonly"],
            foreground=options["foreground"],
            tls=options["tls"],
            tls_certificates=options["tls_certificates"],
            tls_psk=options["tls_psk"],
            tcp_without_tls_for_every_local_user=options["tcp_without_tls_for_every_local_user"],
            metrics=metrics,
            run=options["run_command"],
        )
    else:
        from .frontends import ublk  # noqa: PLC0415

        code = ublk.serve(
            store,
            queues=options["queues"],
            depth=options["depth"],
            dev_id=options["dev_id"],
            swap=options["swap"],
            swap_priority=options["swap_priority"],
            swap_discard=options["swap_discard"],
            swap_placement_may_hang=options["swap_placement_may_hang"],
            recover=options["recover"],
            metrics=metrics,
        )
    sys.exit(code)


_FRONTEND_ONLY: Final = {
    "nbd": frozenset({
        "socket_path", "port", "bind", "readonly", "foreground", "tls", "tls_certificates",
        "tls_psk", "tcp_without_tls_for_every_local_user", "run_command",
    }),
    "ublk": frozenset({
        "queues", "depth", "dev_id", "swap", "swap_priority", "swap_discard",
        "swap_placement_may_hang", "recover",
    }),
}  # fmt: skip


def _refuse_other_frontend_options(ctx: click.Context, frontend: str) -> None:
    """Refuse every option of the other frontend given on the command line (a default is not
    given: `--queues` has one whatever the frontend)."""
    other = "ublk" if frontend == "nbd" else "nbd"
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name in _FRONTEND_ONLY[other]
        and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise InvalidRequest(
            f"{', '.join(given)}: {'an option' if len(given) == 1 else 'options'} of "
            f"--frontend {other}, not {frontend}"
        )


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_served(as_json: bool) -> None:
    """List the stores this user serves: store, frontend, pid, socket or device.

    Root sees root's servers, any other user their own (see dedupblk.served).
    """
    from . import served  # noqa: PLC0415

    found = [record for _, record in served.entries()]
    if as_json:
        _echo(json.dumps([asdict(record) for record in found], indent=2))
        return
    if not found:
        _echo("no served stores")
    for record in found:
        _echo(f"{record.store}  {record.frontend}  pid {record.pid}  {record.endpoint}")


@main.command()
@click.argument("store", type=click.Path())
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to exit.",
)
def stop(store: str, timeout: float) -> None:
    """Stop the server of STORE (SIGTERM) and wait until it has exited."""
    from . import served  # noqa: PLC0415

    for record in served.stop(store, timeout=timeout):
        _echo(f"stopped {record.store} ({record.frontend}, pid {record.pid})")


@main.command()
@click.option("--cleanup", is_flag=True, help="Delete ublk devices whose server is gone.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--has-device",
    type=click.IntRange(min=0),
    metavar="N",
    help="Print nothing; exit 0 if device N is listed (by --json), 1 if not.",
)
def devices(cleanup: bool, as_json: bool, has_device: int | None) -> None:
    """List ublk devices and their state (live, quiesced: waiting for serve --recover, dead)."""
    from .ublk import control  # noqa: PLC0415

    if has_device is not None:
        if cleanup or as_json:
            raise InvalidRequest("--has-device answers with its exit status alone")
        # The same records --json prints: the systemd unit decides on recovery with this.
        sys.exit(0 if any(d.dev_id == has_device for d in control.list_devices()) else 1)
    if cleanup:
        for dev_id in control.cleanup_devices():
            click.echo(f"deleted ublk device {dev_id}")
        return
    found = control.list_devices()
    if as_json:
        click.echo(json.dumps([asdict(d) for d in found], indent=2))
        return
    if not found:
        click.echo("no ublk devices")
    for d in found:
        server = f"pid {d.server_pid}" + ("" if d.server_alive else " (gone)")
        recovery = ", recoverable" if d.recoverable else ""
        click.echo(
            f"{d.block_device}  {d.state}  queues {d.queues} depth {d.depth}  "
            f"server {server}{recovery}"
        )


@main.command()
@click.option(
    "--pages",
    type=int,
    default=bench_module.DEFAULT_PAGES,
    show_default=True,
    help="Pages written (then read) per workload; at least 1.",
)
@click.option(
    "--rounds",
    type=int,
    default=bench_module.DEFAULT_ROUNDS,
    show_default=True,
    help="Rounds per workload (the median is shown); at least 1.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help=f"An existing directory for the stores, not on tmpfs (default: "
    f"${bench_module.DIR_ENV}, else {bench_module.DEFAULT_DIR}).",
)
def bench(pages: int, rounds: int, directory: str | None) -> None:
    """In-process store benchmark: 4 KiB page writes/s and reads/s at 0%, 50% and 90% duplicates.

    Each workload writes PAGES random pages with group commit and a final flush, then reads as
    many; figures are medians over the rounds, comparable only within one run.
    """
    sys.exit(bench_module.run(pages=pages, rounds=rounds, directory=directory))


@main.command()
@click.argument("store", type=click.Path())
@click.argument("offset", type=SIZE)
@click.argument("length", type=SIZE)
def dump(store: str, offset: int, length: int) -> None:
    """Write LENGTH bytes of the device at OFFSET to stdout (for scripts)."""
    with open_store(store, readonly=True) as opened:
        if offset + length > opened.size:
            raise InvalidRequest(
                f"bytes {offset}-{offset + length - 1} are outside the device ({opened.size} bytes)"
            )
        end = offset + length
        for start in range(offset, end, DUMP_CHUNK):
            _write_stdout(opened.read(start, min(DUMP_CHUNK, end - start)))


def _print(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _echo(json.dumps(record, indent=2))
        return
    width = max(len(key) for key in record)
    for key, value in record.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        _echo(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
