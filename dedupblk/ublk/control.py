"""``/dev/ublk-control``: the driver's control commands, and the devices it has.

`Control` sends one command at a time (add, set parameters, start, stop, delete, recovery) as a
URING_CMD on the control device; `list_devices` and `cleanup_devices` are what
``dedupblk devices`` shows and deletes.  The commands' order in a device's life: docs/ublk.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ..errors import UblkError
from .abi import (
    CONTROL_PATH,
    PAGE_SIZE,
    CtrlCmd,
    CtrlDevInfo,
    CtrlOp,
    Feature,
    Params,
    block_device_path,
    char_device_path,
    state_name,
)
from .uring import SETUP_SQE128, IoUring, Mapping

log = logging.getLogger(__name__)


class Control:
    """``/dev/ublk-control`` with a small SQE128 ring.  One per thread; commands are synchronous.

    Control commands run in an io_uring worker that reads and writes the buffer named in the
    command, so the buffer (one mapped page here) stays alive until the CQE has been seen.
    """

    def __init__(self) -> None:
        try:
            self.fd = os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(
                f"{CONTROL_PATH} does not exist: this kernel has no ublk driver loaded "
                "(CONFIG_BLK_DEV_UBLK, module ublk_drv)"
            ) from None
        except OSError as exc:
            raise UblkError(f"cannot open {CONTROL_PATH}: {exc.strerror}") from exc
        try:
            self._ring = IoUring(4, flags=SETUP_SQE128)
            self._buffer = Mapping.anonymous(PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self._ring.close()
        self._buffer.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(
        self, op: CtrlOp, dev_id: int, *, payload: bytes = b"", reply: int = 0, data: int = 0
    ) -> bytes:
        """Run one control command; return the first ``reply`` bytes of its buffer afterwards.

        Raises `UblkError` carrying the kernel's errno when the command fails.
        """
        length = max(len(payload), reply)
        view = self._buffer.view()
        view[:length] = payload.ljust(length, b"\0")
        cmd = CtrlCmd(dev_id, length=length, addr=self._buffer.address if length else 0, data=data)
        self._ring.prep_uring_cmd(self.fd, op, cmd.pack(), user_data=op)
        self._ring.submit()
        completions = self._ring.completions()
        while not completions:
            completions = self._ring.wait(1)
        (completion,) = completions
        if completion.res < 0:
            raise UblkError(
                f"ublk {op.name} for device {dev_id}: {os.strerror(-completion.res)}",
                errno=-completion.res,
            )
        return bytes(view[:reply])

    def features(self) -> int:
        return int.from_bytes(self.command(CtrlOp.GET_FEATURES, 0, reply=8), "little")

    def add(self, info: CtrlDevInfo) -> CtrlDevInfo:
        raw = self.command(CtrlOp.ADD_DEV, info.dev_id, payload=info.pack(), reply=64)
        return CtrlDevInfo.unpack(raw)

    def info(self, dev_id: int) -> CtrlDevInfo:
        return CtrlDevInfo.unpack(self.command(CtrlOp.GET_DEV_INFO, dev_id, reply=64))

    def set_params(self, dev_id: int, params: Params) -> None:
        self.command(CtrlOp.SET_PARAMS, dev_id, payload=params.pack())

    def params(self, dev_id: int) -> Params:
        # The kernel reads the header's len from our buffer to know how much to fill in.
        query = Params.FORMAT.size.to_bytes(4, "little") + bytes(Params.FORMAT.size - 4)
        return Params.unpack(
            self.command(CtrlOp.GET_PARAMS, dev_id, payload=query, reply=Params.FORMAT.size)
        )

    def start(self, dev_id: int, pid: int) -> None:
        self.command(CtrlOp.START_DEV, dev_id, data=pid)

    def stop(self, dev_id: int) -> None:
        self.command(CtrlOp.STOP_DEV, dev_id)

    def delete(self, dev_id: int) -> None:
        self.command(CtrlOp.DEL_DEV, dev_id)

    def start_recovery(self, dev_id: int) -> None:
        self.command(CtrlOp.START_USER_RECOVERY, dev_id)

    def end_recovery(self, dev_id: int, pid: int) -> None:
        self.command(CtrlOp.END_USER_RECOVERY, dev_id, data=pid)


# -- the device list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One ublk device as ``dedupblk devices`` shows it."""

    dev_id: int
    state: str  # dead, live, quiesced, fail_io
    queues: int
    depth: int
    max_io_buf_bytes: int
    server_pid: int  # -1 once stopped
    server_alive: bool
    flags: int
    block_device: str
    char_device: str

    @property
    def recoverable(self) -> bool:
        return bool(self.flags & Feature.USER_RECOVERY)

    @classmethod
    def of(cls, info: CtrlDevInfo) -> Device:
        """The listing of the device the kernel's record describes."""
        return cls(
            dev_id=info.dev_id,
            state=state_name(info.state),
            queues=info.nr_hw_queues,
            depth=info.queue_depth,
            max_io_buf_bytes=info.max_io_buf_bytes,
            server_pid=info.ublksrv_pid,
            server_alive=_pid_alive(info.ublksrv_pid),
            flags=info.flags,
            block_device=block_device_path(info.dev_id),
            char_device=char_device_path(info.dev_id),
        )


def _device_ids() -> list[int]:
    ids: set[int] = set()
    for directory in ("/sys/class/ublk-char", "/dev"):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                match = re.fullmatch(r"ublkc(\d+)", name)
                if match:
                    ids.add(int(match.group(1)))
    return sorted(ids)


def _pid_alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def list_devices() -> list[Device]:
    """Every ublk device this kernel has, served by dedupblk or not."""
    devices: list[Device] = []
    with Control() as control:
        for dev_id in _device_ids():
            try:
                devices.append(Device.of(control.info(dev_id)))
            except UblkError as exc:
                if exc.errno != errno.ENODEV:  # deleted while we looked
                    raise
    return devices


def _char_device_held(dev_id: int) -> bool:
    """Whether a server has /dev/ublkcN open (the driver allows a single opener)."""
    try:
        fd = os.open(char_device_path(dev_id), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def cleanup_devices() -> list[int]:
    """Delete the devices whose server is gone (dead pid and char device not held).

    A crashed server's device waiting for ``serve --recover`` counts as stale too: deleting it
    fails the I/O that waits on it.  Returns the ids deleted.
    """
    deleted: list[int] = []
    with Control() as control:
        for device in list_devices():
            if device.server_alive or _char_device_held(device.dev_id):
                continue
            try:
                control.delete(device.dev_id)
            except UblkError as exc:
                if exc.errno == errno.ENODEV:
                    continue
                log.error(  # noqa: TRY400 -- a refused command: one line is enough
                    "cannot delete stale ublk device %d: %s", device.dev_id, exc
                )
                continue
            log.info(
                "deleted stale ublk device %d (server pid %d)", device.dev_id, device.server_pid
            )
            deleted.append(device.dev_id)
    return deleted
