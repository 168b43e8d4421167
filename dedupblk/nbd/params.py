"""The nbdkit plugin's ``key=value`` parameters: each parsed as it arrives (`NbdkitPlugin.config`),
checked together once all are in (`Settings.from_parameters`). `HELP` says what each one is, in
the words ``nbdkit python PLUGIN --dump-plugin`` prints (nbdkit 1.32's Python plugin has no
config_help: see the plugin file's docstring):

    store=PATH                 (required) the dedupblk store to serve
    size=SIZE                  create the store with this device size if it is missing
    backend=PATH               with size=: keep the data slots in this file or device
    backend-size=SIZE          with size=: the backend's size
    max-index-entries=N        with size=: bound on the fingerprint index
    max-share=N                with size=: most mappings one data slot may have
    readonly=BOOL              open the store read-only; the export refuses writes
    thread-model=serialize|parallel   nbdkit's thread model (default serialize; for benchmarks)
    control-fd=N               (given by `dedupblk serve`) an inherited pipe's read end: when it
                               is closed, the store is closed and nbdkit ended, idle clients or not
    metrics=[ADDR:]PORT        serve Prometheus metrics over HTTP there (ADDR default 127.0.0.1;
                               `dedupblk.metrics` lists them)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from dedupblk.counters import parse_address
from dedupblk.errors import InvalidRequest
from dedupblk.sizes import parse_size as parse_size_text
from dedupblk.store import PAGE_SIZE
from dedupblk.store.format import DEFAULT_MAX_SHARE

T = TypeVar("T")

THREAD_MODEL_SERIALIZE_ALL_REQUESTS: Final = 1
THREAD_MODEL_PARALLEL: Final = 3

THREAD_MODELS: Final = {
    "parallel": THREAD_MODEL_PARALLEL,
    "serialize": THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
}
# Chosen by measurement (bench/nbd_bench.py and fio over one or two connections, 4 KiB random,
# iodepth 32, 2 cores). Python requests serialise on the GIL and the store's lock anyway; with
# PARALLEL and nbdkit's default 16 threads per connection they also hand both back and forth:
#   IOPS, one connection (medians of 3 rounds, same run)   writes 50% dups   random reads
#   PARALLEL, 16 threads (nbdkit's default)                     15864            20460
#   PARALLEL, --threads 1                                       24190            28057
#   SERIALIZE_ALL_REQUESTS, 16 threads                          22868            27344
# SERIALIZE_ALL_REQUESTS matches PARALLEL with one thread (also over two connections: 26505 vs
# 27041 writes, 27739 vs 29195 reads) and does not depend on how nbdkit was started.
DEFAULT_THREAD_MODEL: Final = "serialize"


class ParameterError(InvalidRequest):
    """A missing, unknown or malformed `key=value`, or a store that cannot be served.

    Raised from config, config_complete and get_ready, before nbdkit serves anything; the plugin
    turns it into one line on stderr and exit status 1 (see `exit_on_parameter_error`).
    """


def exit_on_parameter_error(callback: Callable[..., T]) -> Callable[..., T]:
    """Wrap a configuration callback so that ParameterError ends nbdkit with one line on stderr.

    nbdkit would print a raised exception with its module path and a blank line after it. These
    callbacks run before nbdkit binds a socket, writes a pidfile or starts a `--run` command, so
    there is nothing to clean up and exiting at once is safe.
    """

    @functools.wraps(callback)
    def run(*args: object) -> T:
        try:
            return callback(*args)
        except ParameterError as exc:
            os.write(2, f"nbdkit: dedupblk: error: {exc}\n".encode(errors="replace"))
            os._exit(1)

    return run


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def parse_size(key: str, value: str) -> int:
    """Parse ``value`` in the project's one size grammar (`dedupblk.sizes`)."""
    try:
        return parse_size_text(value)
    except InvalidRequest:
        raise ParameterError(f"{key}={value}: not a size (use bytes or a K/M/G/T suffix)") from None


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ParameterError(f"{key}={value}: not a boolean (use true or false)")


def parse_count(key: str, value: str) -> int:
    if not value.strip().isdigit():
        raise ParameterError(f"{key}={value}: not a non-negative integer")
    return int(value)


def parse_path(key: str, value: str) -> str:
    if not value:
        raise ParameterError(f"{key}=: empty path")
    # nbdkit chdirs to / when it forks into the background: resolve against the start directory.
    return os.path.abspath(value)


def parse_thread_model(key: str, value: str) -> str:
    if value not in THREAD_MODELS:
        raise ParameterError(f"{key}={value}: use one of {', '.join(THREAD_MODELS)}")
    return value


def parse_metrics_address(key: str, value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except InvalidRequest:
        raise ParameterError(
            f"{key}={value}: not PORT, ADDR:PORT or [IPV6]:PORT (port 1-65535)"
        ) from None


PARSERS: Final[dict[str, Callable[[str, str], object]]] = {
    "store": parse_path,
    "size": parse_size,
    "backend": parse_path,
    "backend-size": parse_size,
    "max-index-entries": parse_count,
    "max-share": parse_count,
    "readonly": parse_bool,
    "thread-model": parse_thread_model,
    "control-fd": parse_count,
    "metrics": parse_metrics_address,
}


# One line each, as `--dump-plugin` prints them (``dedupblk_parameter_KEY=HELP``).
HELP: Final[dict[str, str]] = {
    "store": "PATH (required): the dedupblk store to serve; store= must be spelled out",
    "size": "SIZE: create the store with this device size if it is missing (e.g. 4G)",
    "backend": "PATH: with size=, keep the data slots in this file or block device",
    "backend-size": "SIZE: with size=, the capacity of a new backend file",
    "max-index-entries": "N: with size=, a bound on the fingerprint index",
    "max-share": f"N: with size=, most mappings a data slot may have (default {DEFAULT_MAX_SHARE})",
    "readonly": "BOOL: open the store read-only; the export refuses writes (default false)",
    "thread-model": f"serialize|parallel: nbdkit's thread model (default {DEFAULT_THREAD_MODEL})",
    "control-fd": "N: set by dedupblk serve; when this pipe closes, close the store and exit",
    "metrics": "[ADDR:]PORT: serve Prometheus metrics over HTTP there (on 127.0.0.1 by default)",
}


def parse_parameter(key: str, value: str) -> object:
    """The value of one ``key=value``, parsed by its key's parser."""
    parser = PARSERS.get(key)
    if parser is None:
        raise ParameterError(f"unknown parameter {key}= (known: {', '.join(PARSERS)})")
    return parser(key, value)


_CREATE_ONLY: Final = ("backend", "backend-size", "max-index-entries", "max-share")


@dataclass(frozen=True)
class Settings:
    """The validated parameters."""

    store: str
    size: int | None = None
    backend: str | None = None
    backend_size: int | None = None
    max_index_entries: int | None = None
    max_share: int | None = None
    readonly: bool = False
    thread_model: str = DEFAULT_THREAD_MODEL
    control_fd: int | None = None
    metrics: tuple[str, int] | None = None

    @classmethod
    def from_parameters(cls, params: dict[str, object]) -> Settings:
        store = params.get("store")
        if not isinstance(store, str):
            raise ParameterError("store=PATH is required")
        if "size" not in params:
            given = [key for key in _CREATE_ONLY if key in params]
            if given:
                raise ParameterError(f"{given[0]}= only applies when size= creates the store")
        size = params.get("size")
        if isinstance(size, int) and (size <= 0 or size % PAGE_SIZE):
            raise ParameterError(f"size={size}: must be a positive multiple of {PAGE_SIZE}")
        return cls(
            store=store,
            size=_optional_int(params, "size"),
            backend=_optional_str(params, "backend"),
            backend_size=_optional_int(params, "backend-size"),
            max_index_entries=_optional_int(params, "max-index-entries"),
            max_share=_optional_int(params, "max-share"),
            readonly=params.get("readonly") is True,
            thread_model=str(params.get("thread-model", DEFAULT_THREAD_MODEL)),
            control_fd=_optional_int(params, "control-fd"),
            metrics=_optional_address(params, "metrics"),
        )


def _optional_int(params: dict[str, object], key: str) -> int | None:
    value = params.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _optional_str(params: dict[str, object], key: str) -> str | None:
    value = params.get(key)
    return value if isinstance(value, str) else None


def _optional_address(params: dict[str, object], key: str) -> tuple[str, int] | None:
    value = params.get(key)
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None
