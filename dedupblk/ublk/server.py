"""A ublk device's life cycle: add (or recover) it, serve its queues, stop and delete it.

`Server.run` adds the device and sets its parameters (or takes over a crashed server's device),
starts one `Queue` per hardware queue, has a starter thread send START_DEV, then waits in
``sigwait`` for a stop signal; with swap it runs swapon after the start and swapoff before the
stop.  The steps and what a crash leaves: docs/ublk.md.  Must run in the main thread, inside
`signals_blocked`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from ..errors import InvalidRequest, UblkError
from .abi import (
    MAX_NR_QUEUES,
    MAX_QUEUE_DEPTH,
    PAGE_SHIFT,
    SECTOR_SHIFT,
    UBLK_ATTR_FUA,
    UBLK_ATTR_VOLATILE_CACHE,
    UBLK_PARAM_TYPE_BASIC,
    UBLK_PARAM_TYPE_DISCARD,
    CtrlDevInfo,
    Feature,
    Params,
    block_device_path,
    char_device_path,
    state_name,
)
from .control import Control
from .hardening import set_io_flusher
from .placement import is_active_swap, swap_off, swap_on
from .queue import Handler, Queue

log = logging.getLogger(__name__)

# The device's logical and physical block (Params' default shifts).
BLOCK_SIZE: Final = 1 << PAGE_SHIFT
# Per-tag buffer: the largest request the kernel may send (it splits larger ones).  Every tag of
# every queue has one, all locked in memory, so the budget is per queue: 64 tags of 16 KiB at the
# default depth, enough for a swap device (the kernel swaps out a page or a small folio at a
# time); a pass's pages are copied into the store's pending batch, so this also bounds that
# (docs/measurements.md, "Server memory").
MAX_IO_BUF_BYTES: Final = 512 * 1024
MIN_IO_BUF_BYTES: Final = 16 * 1024
QUEUE_BUFFER_BUDGET: Final = 1024 * 1024
# Largest DISCARD / WRITE_ZEROES: one request holds the store's lock for its whole range.
MAX_DISCARD_BYTES: Final = 64 * 1024 * 1024
# How long to wait for a dead server's device to become recoverable, or for a char device
# that udev (or the previous server) still holds.
RECOVERY_WAIT_SECONDS: Final = 30.0
OPEN_WAIT_SECONDS: Final = 10.0
RETRY_INTERVAL_SECONDS: Final = 0.1

# The signals the main thread waits for.  SIGUSR1 is internal: a helper thread (queue or
# starter) changed state and the main thread should look.
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
WAKE_SIGNAL: Final = signal.SIGUSR1
WAITED_SIGNALS: Final = STOP_SIGNALS | {WAKE_SIGNAL}


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block the waited-for signals in this thread (and so in every thread it starts); drain
    any still pending on the way out so that none fires after the server returns."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    try:
        yield
    finally:
        while signal.sigtimedwait(WAITED_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise InvalidRequest("the ublk server must run in the main thread (it waits for signals)")


def wake_main_thread() -> None:
    """Tell the main thread (waiting in sigwait) that a helper thread changed state."""
    os.kill(os.getpid(), WAKE_SIGNAL)


def io_buffer_bytes(depth: int) -> int:
    """Per-tag buffer size for a queue of ``depth`` tags: at most `MAX_IO_BUF_BYTES`, and
    `QUEUE_BUFFER_BUDGET` per queue unless that would go below `MIN_IO_BUF_BYTES`."""
    fair = QUEUE_BUFFER_BUDGET // depth // BLOCK_SIZE * BLOCK_SIZE
    return max(MIN_IO_BUF_BYTES, min(MAX_IO_BUF_BYTES, fair))


@dataclass
class _Starter:
    """START_DEV / END_USER_RECOVERY, sent from its own thread: it returns only after the kernel
    has read the partition table through the queue threads, so they must already be serving."""

    dev_id: int
    recovering: bool
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            set_io_flusher()
            with Control() as control:
                if self.recovering:
                    control.end_recovery(self.dev_id, os.getpid())
                else:
                    control.start(self.dev_id, os.getpid())
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which reports it
            self.error = exc
        finally:
            self.done = True
            wake_main_thread()


class Server:
    """One ublk device served until a stop signal; the options are checked on construction.

    ``recover``: take over device N, left quiesced by a server that died, instead of adding one.
    ``swap``: mkswap and swapon the device once started (not when recovering: swap is still on).
    """

    def __init__(
        self,
        *,
        queues: int = 1,
        depth: int = 64,
        dev_id: int | None = None,
        swap: bool = False,
        swap_priority: int | None = None,
        swap_discard: bool | None = None,
        recover: int | None = None,
    ) -> None:
        if not 1 <= queues <= MAX_NR_QUEUES:
            raise InvalidRequest(f"bad queue count {queues}: 1 to {MAX_NR_QUEUES}")
        if not 1 <= depth <= MAX_QUEUE_DEPTH:
            raise InvalidRequest(f"bad queue depth {depth}: 1 to {MAX_QUEUE_DEPTH}")
        if dev_id is not None and not 0 <= dev_id < 1 << 20:
            raise InvalidRequest(f"bad device id {dev_id}")
        if (swap_priority is not None or swap_discard) and not swap:
            raise InvalidRequest("--swap-priority and --swap-discard need --swap")
        if swap_priority is not None and not -1 <= swap_priority <= 32767:
            raise InvalidRequest(f"bad swap priority {swap_priority}: -1 to 32767")
        if recover is not None and dev_id is not None and recover != dev_id:
            raise InvalidRequest(
                "--recover names the device: do not also give a different --dev-id"
            )
        self.queues = queues
        self.depth = depth
        self.dev_id = dev_id
        self.swap = swap
        self.swap_priority = swap_priority
        # A ublk device hears of freed swap slots only through swap's discards (docs/swap.md,
        # "Freed swap slots"): on unless refused.
        self.swap_discard = swap and swap_discard is not False
        self.recover = recover
        self.hw_queues: list[Queue] = []
        self.char_fd = -1
        self.starter: _Starter | None = None
        self.starter_thread: threading.Thread | None = None
        self.started = False
        self.on_ready: Callable[[str], None] | None = None
        self.on_stopping: Callable[[str], None] | None = None

    def run(
        self,
        handler: Handler,
        *,
        size: int,
        on_ready: Callable[[str], None] | None = None,
        on_stopping: Callable[[str], None] | None = None,
    ) -> int:
        """Add (or recover) a device of ``size`` bytes, answer its requests with ``handler``
        until a stop signal, remove it; the exit code.

        Prints the block device's path alone on a line of stdout once the device is started
        (and, with swap, swap is on), and then calls ``on_ready(path)``; calls
        ``on_stopping(path)`` when a stop signal arrives, before swapoff.  Raises `UblkError`
        (or `InvalidRequest`: a recovered device of another size) if serving cannot begin.
        """
        self.on_ready = on_ready
        self.on_stopping = on_stopping
        with Control() as control:
            if self.recover is None:
                info = self._add_device(control, size)
            else:
                info = self._begin_recovery(control, size)
            status = 1
            try:
                status = self._serve(handler, info)
            finally:
                status = self._remove(control, info) or status
        return status

    def _add_device(self, control: Control, size: int) -> CtrlDevInfo:
        wanted = Feature.USER_RECOVERY | Feature.USER_RECOVERY_REISSUE | Feature.CMD_IOCTL_ENCODE
        offered = control.features()
        flags = int(wanted) & offered
        if not flags & Feature.USER_RECOVERY:
            log.warning("this ublk driver has no USER_RECOVERY: a crash will remove the device")
        request = CtrlDevInfo(
            nr_hw_queues=self.queues,
            queue_depth=self.depth,
            state=0,
            max_io_buf_bytes=io_buffer_bytes(self.depth),
            dev_id=0xFFFF_FFFF if self.dev_id is None else self.dev_id,
            ublksrv_pid=os.getpid(),  # lets `cleanup_devices` tell a never-started orphan
            flags=flags,
        )
        info = control.add(request)
        log.info(
            "added ublk device %d: %d queue(s) of depth %d, flags %#x",
            info.dev_id, info.nr_hw_queues, info.queue_depth, info.flags,
        )  # fmt: skip
        try:
            discard_sectors = MAX_DISCARD_BYTES >> SECTOR_SHIFT
            params = Params(
                types=UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
                attrs=UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
                max_sectors=info.max_io_buf_bytes >> SECTOR_SHIFT,
                dev_sectors=size >> SECTOR_SHIFT,
                discard_granularity=BLOCK_SIZE,
                max_discard_sectors=discard_sectors,
                max_write_zeroes_sectors=discard_sectors,
                max_discard_segments=1,
            )
            control.set_params(info.dev_id, params)
        except BaseException:
            try:
                control.delete(info.dev_id)
            except UblkError as exc:
                log.warning("cleanup of ublk device %d: %s", info.dev_id, exc)
            raise
        return info

    def _begin_recovery(self, control: Control, size: int) -> CtrlDevInfo:
        assert self.recover is not None
        dev_id = self.recover
        info = control.info(dev_id)
        if not info.flags & Feature.USER_RECOVERY:
            raise UblkError(f"ublk device {dev_id} was created without USER_RECOVERY")
        params = control.params(dev_id)
        if params.dev_sectors << SECTOR_SHIFT != size:
            raise InvalidRequest(
                f"ublk device {dev_id} has {params.dev_sectors << SECTOR_SHIFT} bytes, the store "
                f"{size}: not the store it was serving"
            )
        deadline = time.monotonic() + RECOVERY_WAIT_SECONDS
        while True:
            try:
                control.start_recovery(dev_id)
                break
            except UblkError as exc:
                # EBUSY until the dead server's char device is released and the driver has
                # quiesced the device.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise UblkError(
                        f"cannot recover ublk device {dev_id} (state "
                        f"{state_name(control.info(dev_id).state)}, server pid "
                        f"{info.ublksrv_pid}): {exc}"
                    ) from exc
                time.sleep(RETRY_INTERVAL_SECONDS)
        log.info("recovering ublk device %d", dev_id)
        return control.info(dev_id)

    def _serve(self, handler: Handler, info: CtrlDevInfo) -> int:
        self.char_fd = _open_char_device(info.dev_id)
        self.hw_queues = [
            Queue(
                handler,
                self.char_fd,
                q_id=q,
                depth=info.queue_depth,
                buffer_bytes=info.max_io_buf_bytes,
                notify=wake_main_thread,
            )
            for q in range(info.nr_hw_queues)
        ]
        for queue in self.hw_queues:
            queue.start()
        for queue in self.hw_queues:
            queue.settled.wait()
        for queue in self.hw_queues:
            if queue.error is not None:
                raise UblkError(f"ublk queue {queue.q_id} could not start: {queue.error}")
        self.starter = _Starter(info.dev_id, recovering=self.recover is not None)
        self.starter_thread = threading.Thread(
            target=self.starter.run, name="ublk-start", daemon=True
        )
        self.starter_thread.start()
        return self._wait_for_signals(info)

    def _wait_for_signals(self, info: CtrlDevInfo) -> int:
        path = block_device_path(info.dev_id)
        assert self.starter is not None
        while True:
            signum = signal.sigwait(WAITED_SIGNALS)
            if signum in STOP_SIGNALS:
                log.info("%s: stopping %s", signal.Signals(signum).name, path)
                if self.on_stopping is not None:
                    self.on_stopping(path)
                if self._swap_off(path):
                    return 0
                continue
            if self.starter.done and not self.started:
                if self.starter.error is not None:
                    log.error("cannot start %s: %s", path, self.starter.error)
                    return 1
                self.started = True
                if self.swap and self.recover is None:
                    try:
                        swap_on(path, priority=self.swap_priority, discard=self.swap_discard)
                    except UblkError as exc:
                        log.error("%s", exc)  # noqa: TRY400 -- a failed tool: one line is enough
                        return 1
                # The line a caller waits for: the device is ready for its purpose.
                sys.stdout.write(path + "\n")
                sys.stdout.flush()
                if self.on_ready is not None:
                    self.on_ready(path)
            dead = [q for q in self.hw_queues if not q.thread.is_alive()]
            if dead:
                log.error(
                    "ublk queue(s) %s ended while serving %s: stopping",
                    ", ".join(str(q.q_id) for q in dead), path,
                )  # fmt: skip
                return 1

    def _swap_off(self, path: str) -> bool:
        """swapoff if the device is in use as swap (by us or anyone); False if that failed."""
        if not self.started or not is_active_swap(path):
            return True
        try:
            swap_off(path)
        except UblkError as exc:
            log.error(  # noqa: TRY400 -- a failed tool: one line is enough
                "%s; still serving %s (stopping now would fail its swapped pages): send the "
                "signal again to retry", exc, path,
            )  # fmt: skip
            return False
        return True

    def _remove(self, control: Control, info: CtrlDevInfo) -> int:
        """Stop the device while the queues still serve, let them drain, then delete it.

        Returns 1 if something went wrong on the way (logged), else 0.
        """
        status = 0
        dev_id = info.dev_id
        if self.starter_thread is not None:
            # A START_DEV arriving after STOP_DEV would add a disk that nobody serves.
            self.starter_thread.join()
        if self.started:
            # Dirty page cache of the block device is written while it can still be served.
            with contextlib.suppress(OSError):
                _sync_block_device(block_device_path(dev_id))
        if self.recover is not None and not self.started:
            if not any(queue.thread.is_alive() for queue in self.hw_queues):
                # No queue of ours holds a command: the device stays quiesced, and another
                # --recover may try again.
                log.error("recovery of ublk device %d failed; it stays quiesced", dev_id)
                self._close_char_device()
                return 1
            # Some queue threads wait for requests that will never come: only STOP_DEV ends
            # their commands, so this failed recovery removes the device.
            log.error("recovery of ublk device %d failed; removing it", dev_id)
            status = 1
        if not _unless_gone(control.stop, dev_id):
            status = 1
        for queue in self.hw_queues:
            queue.thread.join()
        self._close_char_device()
        if not _unless_gone(control.delete, dev_id):
            status = 1
        for queue in self.hw_queues:
            if queue.error is not None or queue.refused:
                status = 1
        log.info("ublk device %d removed", dev_id)
        return status

    def _close_char_device(self) -> None:
        if self.char_fd >= 0:
            os.close(self.char_fd)
            self.char_fd = -1


def _unless_gone(command: Callable[[int], None], dev_id: int) -> bool:
    """Send a stop or delete; False if the driver refused it (logged), not if the device is
    already gone."""
    try:
        command(dev_id)
    except UblkError as exc:
        if exc.errno != errno.ENODEV:
            log.error("%s", exc)  # noqa: TRY400 -- a refused command: one line is enough
            return False
    return True


def _open_char_device(dev_id: int) -> int:
    """Open /dev/ublkcN, waiting while udev (just after ADD_DEV) still holds or creates it."""
    path = char_device_path(dev_id)
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOENT) or time.monotonic() > deadline:
                raise UblkError(f"cannot open {path}: {exc.strerror}") from exc
            time.sleep(RETRY_INTERVAL_SECONDS)


def _sync_block_device(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
