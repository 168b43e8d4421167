"""A small typed io_uring over ctypes: just what the ublk server needs.

No PyPI binding can issue ``IORING_OP_URING_CMD`` with a 128-byte SQE and a command payload of its
own, so this module talks to the kernel directly: ``io_uring_setup`` (425) and ``io_uring_enter``
(426) through `dedupblk.libc`, whose calls release the GIL, so a thread waiting in
``io_uring_enter`` does not stop the others.

Layouts (little-endian, x86-64; offsets in bytes; ``struct`` formats beside each)
-----------------------------------------------------------------------------------
``io_uring_params`` (120, `IoUringParams`)::

    sq_entries@0 cq_entries@4 flags@8 sq_thread_cpu@12 sq_thread_idle@16 features@20 wq_fd@24
    resv[3]@28 sq_off@40 (io_sqring_offsets) cq_off@80 (io_cqring_offsets)

``io_sqring_offsets`` (40, `SqRingOffsets`, "<7IIQ"): head tail ring_mask ring_entries flags
dropped array resv1 user_addr.  ``io_cqring_offsets`` (40, `CqRingOffsets`, "<8IQ"): head tail
ring_mask ring_entries overflow cqes flags resv1 user_addr.  Both give positions inside the ring
mappings: the SQ ring at mmap offset 0, the CQ ring at 0x8000000 (one shared mapping when the kernel
reports ``IORING_FEAT_SINGLE_MMAP``), the SQE array at 0x10000000.

SQE (64 bytes, or 128 with ``IORING_SETUP_SQE128``; slot i at i * size), `SQE_HEADER`
"<BBHiQQIIQHHiQQ"::

    opcode@0 flags@1 ioprio@2 fd@4 off@8 (cmd_op u32 + pad u32 for URING_CMD) addr@16 len@24
    op_flags@28 user_data@32 buf_index@40 personality@42 file_index@44 addr3@48 pad2@56

``IORING_OP_URING_CMD`` puts its command payload at byte 48 instead of addr3/pad2: 16 bytes in a
64-byte SQE, 80 bytes in a 128-byte one.

CQE (16 bytes), `CQE` "<QiI": user_data@0 res@8 flags@12.

Memory ordering
---------------
The rings are shared with the kernel, which in liburing needs ``smp_store_release`` when
publishing the SQ tail or CQ head and ``smp_load_acquire`` when reading the SQ head or CQ tail.
Here every ring access is a plain 32-bit load or store done by ctypes, in program order, each
inside an opaque call the interpreter makes.  On x86-64 (TSO: stores are not reordered with older
stores, loads not with older loads) plain accesses in program order already have release/acquire
semantics, so that is enough: SQE bytes are written before the tail that publishes them, and the
CQ tail is read before the CQEs it covers.  Weaker architectures would need real fences, so
`IoUring` refuses to run anywhere else.

Concurrency: one `IoUring` belongs to one thread (the ublk queue rings are even created with
``IORING_SETUP_SINGLE_ISSUER``); nothing here takes a lock.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from types import TracebackType
from typing import Final, NamedTuple, Self

from ..libc import function, libc, os_error

__all__ = [
    "CQE",
    "SETUP_COOP_TASKRUN",
    "SETUP_DEFER_TASKRUN",
    "SETUP_SINGLE_ISSUER",
    "SETUP_SQE128",
    "SQE_HEADER",
    "Completion",
    "CqRingOffsets",
    "IoUring",
    "IoUringParams",
    "Mapping",
    "SqRingOffsets",
    "SubmissionQueueFullError",
]

SYS_IO_URING_SETUP: Final = 425
SYS_IO_URING_ENTER: Final = 426

# io_uring_setup flags.
SETUP_COOP_TASKRUN: Final = 1 << 8
SETUP_SQE128: Final = 1 << 10
SETUP_SINGLE_ISSUER: Final = 1 << 12
SETUP_DEFER_TASKRUN: Final = 1 << 13

FEAT_SINGLE_MMAP: Final = 1 << 0
ENTER_GETEVENTS: Final = 1 << 0

OFF_SQ_RING: Final = 0x0
OFF_CQ_RING: Final = 0x8000000
OFF_SQES: Final = 0x10000000

# Opcodes (enum io_uring_op).
OP_NOP: Final = 0
OP_READ: Final = 22
OP_WRITE: Final = 23
OP_URING_CMD: Final = 46

SQE_HEADER: Final = struct.Struct("<BBHiQQIIQHHiQQ")
CQE: Final = struct.Struct("<QiI")
CMD_PAYLOAD_OFFSET: Final = 48
assert SQE_HEADER.size == 64
assert CQE.size == 16

_U32_MASK: Final = 0xFFFF_FFFF
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

# syscall(2) is variadic: its arguments are passed as the ctypes values the callers build.
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_mmap = function(
    "mmap", ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)  # fmt: skip
_munmap = function("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)


class SqRingOffsets(ctypes.Structure):
    """``struct io_sqring_offsets`` (40 bytes, "<7IIQ")."""

    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class CqRingOffsets(ctypes.Structure):
    """``struct io_cqring_offsets`` (40 bytes, "<8IQ")."""

    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class IoUringParams(ctypes.Structure):
    """``struct io_uring_params`` (120 bytes, "<7I3I" + two 40-byte offset blocks)."""

    _fields_ = (
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", SqRingOffsets),
        ("cq_off", CqRingOffsets),
    )


assert ctypes.sizeof(SqRingOffsets) == 40
assert ctypes.sizeof(CqRingOffsets) == 40
assert ctypes.sizeof(IoUringParams) == 120
assert IoUringParams.sq_off.offset == 40
assert IoUringParams.cq_off.offset == 80


class Completion(NamedTuple):
    """One CQE: what the kernel reports for the SQE carrying ``user_data``."""

    user_data: int
    res: int  # >= 0: the operation's result; < 0: -errno
    flags: int


class SubmissionQueueFullError(RuntimeError):
    """Every SQ slot holds an SQE not yet submitted: call `IoUring.submit` first."""


class Mapping:
    """A region mapped with mmap(2) at a fixed address that the kernel can be told about.

    Python's `mmap.mmap` hides the address and cannot be closed while a ctypes view of it lives;
    these regions are handed to the kernel by address (ring memory, per-tag I/O buffers), so they
    are mapped through libc and unmapped explicitly.  `close` invalidates `address` and every view:
    touching them afterwards is a crash, which is why the owners close only after their threads
    have stopped using them.
    """

    __slots__ = ("_address", "_closed", "_size", "writable")

    def __init__(self, address: int, size: int, *, writable: bool) -> None:
        self._address = address
        self._size = size
        self._closed = False
        self.writable = writable

    @classmethod
    def anonymous(cls, size: int) -> Mapping:
        """Private zero-filled memory, page-aligned (what ublk wants for per-tag buffers)."""
        return cls._map(
            size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
        )

    @classmethod
    def of_file(cls, fd: int, size: int, offset: int, *, writable: bool = True) -> Mapping:
        """A shared mapping of ``size`` bytes of ``fd`` at ``offset`` (rings, ublk descriptors)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return cls._map(size, prot, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, offset)

    @classmethod
    def _map(cls, size: int, prot: int, flags: int, fd: int, offset: int) -> Mapping:
        if size <= 0:
            raise ValueError(f"mapping size must be positive, not {size}")
        address = _mmap(None, size, prot, flags, fd, offset)
        if address is None or address == _MAP_FAILED:
            raise os_error("mmap")
        assert address is not None
        return cls(address, size, writable=bool(prot & mmap.PROT_WRITE))

    @property
    def address(self) -> int:
        if self._closed:
            raise ValueError("mapping is closed")
        return self._address

    @property
    def size(self) -> int:
        return self._size

    def buffer(self) -> ctypes.Array[ctypes.c_char]:
        """A ctypes char array over the whole region (accepted by struct.pack_into/unpack_from)."""
        return (ctypes.c_char * self._size).from_address(self.address)

    def view(self) -> memoryview:
        """A byte view of the whole region; read-only if the mapping is."""
        view = memoryview(self.buffer()).cast("B")
        return view if self.writable else view.toreadonly()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _munmap(self._address, self._size) != 0:
            raise os_error("munmap")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class IoUring:
    """One io_uring instance: its SQ and CQ rings and its SQE array, mapped into this process.

    Usage: reserve and fill SQEs with the ``prep_*`` methods (each takes the next free slot), then
    `submit` or `submit_and_wait`, then drain `completions`.  Buffers named in an SQE (read and
    write targets, the memory a URING_CMD payload points to) must stay mapped until that SQE's CQE
    has been seen: the ring keeps no reference to them.
    """

    def __init__(self, entries: int, *, flags: int = 0) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(
                "dedupblk's io_uring relies on x86-64 store and load ordering for its ring "
                f"accesses (see the module docstring); this is {platform.machine()}"
            )
        params = IoUringParams()
        params.flags = flags
        fd = _syscall(
            ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries), ctypes.byref(params)
        )
        if fd < 0:
            raise os_error("io_uring_setup")
        self.fd: int = fd
        self.flags = flags
        self.features: int = params.features
        self.sq_entries: int = params.sq_entries
        self.cq_entries: int = params.cq_entries
        self.sqe_size = 128 if flags & SETUP_SQE128 else 64
        self.cmd_payload_size = self.sqe_size - CMD_PAYLOAD_OFFSET
        # A whole URING_CMD SQE in one pack: the 48 header bytes, then the command area ("Ns"
        # pads a shorter payload with zeros, so no separate clearing of the slot is needed).
        self._cmd_sqe = struct.Struct(f"{SQE_HEADER.format[:13]}{self.cmd_payload_size}s")
        assert self._cmd_sqe.size == self.sqe_size
        self._mappings: list[Mapping] = []
        self._closed = False
        try:
            self._map_rings(params)
        except BaseException:
            self.close()
            raise
        self._sqe_tail: int = self._sq_tail.value  # one past the last SQE we filled

    def _map_rings(self, params: IoUringParams) -> None:
        sq_off, cq_off = params.sq_off, params.cq_off
        sq_size = sq_off.array + params.sq_entries * 4
        cq_size = cq_off.cqes + params.cq_entries * CQE.size
        if params.features & FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
            sq_ring = Mapping.of_file(self.fd, sq_size, OFF_SQ_RING)
            self._mappings.append(sq_ring)
            cq_ring = sq_ring
        else:
            sq_ring = Mapping.of_file(self.fd, sq_size, OFF_SQ_RING)
            self._mappings.append(sq_ring)
            cq_ring = Mapping.of_file(self.fd, cq_size, OFF_CQ_RING)
            self._mappings.append(cq_ring)
        sqes = Mapping.of_file(self.fd, params.sq_entries * self.sqe_size, OFF_SQES)
        self._mappings.append(sqes)

        sq, cq = sq_ring.address, cq_ring.address
        self._sq_head = ctypes.c_uint32.from_address(sq + sq_off.head)
        self._sq_tail = ctypes.c_uint32.from_address(sq + sq_off.tail)
        self._sq_mask: int = ctypes.c_uint32.from_address(sq + sq_off.ring_mask).value
        self._cq_head = ctypes.c_uint32.from_address(cq + cq_off.head)
        self._cq_tail = ctypes.c_uint32.from_address(cq + cq_off.tail)
        self._cq_mask: int = ctypes.c_uint32.from_address(cq + cq_off.ring_mask).value
        self._cqes = (ctypes.c_char * (params.cq_entries * CQE.size)).from_address(cq + cq_off.cqes)
        self._sqes = sqes.buffer()
        # The SQ array maps ring positions to SQE slots; the identity map lets slot = tail & mask.
        sq_array = (ctypes.c_uint32 * params.sq_entries).from_address(sq + sq_off.array)
        for i in range(params.sq_entries):
            sq_array[i] = i

    # -- submission ---------------------------------------------------------------------------

    def sq_space_left(self) -> int:
        return self.sq_entries - (self._sqe_tail - self._sq_head.value) % (1 << 32)

    def _next_sqe(self) -> int:
        """Reserve the next SQE slot, zero it and return its byte offset in the SQE array."""
        if self.sq_space_left() <= 0:
            raise SubmissionQueueFullError(f"all {self.sq_entries} SQ slots are pending")
        offset = (self._sqe_tail & self._sq_mask) * self.sqe_size
        self._sqe_tail = (self._sqe_tail + 1) & _U32_MASK
        return offset

    def _prep(
        self,
        opcode: int,
        fd: int,
        *,
        off: int = 0,
        addr: int = 0,
        length: int = 0,
        op_flags: int = 0,
        user_data: int,
    ) -> int:
        offset = self._next_sqe()
        SQE_HEADER.pack_into(
            self._sqes,
            offset,
            opcode,
            0,
            0,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            0,
            0,
            0,
            0,
            0,
        )
        if self.sqe_size > SQE_HEADER.size:
            ctypes.memset(
                ctypes.addressof(self._sqes) + offset + SQE_HEADER.size,
                0,
                self.sqe_size - SQE_HEADER.size,
            )
        return offset

    def prep_nop(self, *, user_data: int) -> None:
        self._prep(OP_NOP, -1, user_data=user_data)

    def prep_read(
        self,
        fd: int,
        buf: Mapping,
        offset: int,
        *,
        length: int | None = None,
        buf_offset: int = 0,
        user_data: int,
    ) -> None:
        """pread(fd, buf[buf_offset:buf_offset+length], offset); res = bytes read or -errno."""
        addr, length = self._span(buf, buf_offset, length)
        self._prep(OP_READ, fd, off=offset, addr=addr, length=length, user_data=user_data)

    def prep_write(
        self,
        fd: int,
        buf: Mapping,
        offset: int,
        *,
        length: int | None = None,
        buf_offset: int = 0,
        user_data: int,
    ) -> None:
        """pwrite(fd, buf[buf_offset:buf_offset+length], offset); res = bytes written or -errno."""
        addr, length = self._span(buf, buf_offset, length)
        self._prep(OP_WRITE, fd, off=offset, addr=addr, length=length, user_data=user_data)

    @staticmethod
    def _span(buf: Mapping, buf_offset: int, length: int | None) -> tuple[int, int]:
        if length is None:
            length = buf.size - buf_offset
        if buf_offset < 0 or length < 0 or buf_offset + length > buf.size:
            raise ValueError(f"span {buf_offset}+{length} is outside a {buf.size}-byte buffer")
        return buf.address + buf_offset, length

    def prep_uring_cmd(self, fd: int, cmd_op: int, payload: bytes, *, user_data: int) -> None:
        """IORING_OP_URING_CMD on ``fd``: ``cmd_op`` at SQE byte 8, ``payload`` at byte 48."""
        if len(payload) > self.cmd_payload_size:
            raise ValueError(
                f"a {len(payload)}-byte command does not fit the {self.cmd_payload_size} bytes "
                f"of a {self.sqe_size}-byte SQE"
            )
        offset = self._next_sqe()
        self._cmd_sqe.pack_into(
            self._sqes, offset, OP_URING_CMD, 0, 0, fd, cmd_op & _U32_MASK, 0, 0, 0, user_data,
            0, 0, 0, payload,
        )  # fmt: skip

    def submit(self) -> int:
        """Hand every prepared SQE to the kernel without waiting; returns how many it took."""
        return self._enter(0)

    def submit_and_wait(self, wait_nr: int = 1) -> int:
        """Submit every prepared SQE, then wait until at least ``wait_nr`` CQEs are ready.

        Returns how many SQEs were submitted.  A signal may end the wait early (then fewer CQEs
        are ready); callers drain `completions` and loop, as they must anyway.
        """
        return self._enter(wait_nr)

    def get_events(self) -> int:
        """Submit every prepared SQE and collect what has completed, without waiting.

        On a ring set up with ``SETUP_DEFER_TASKRUN`` completions that arrive while the owner
        runs (a ublk request, a ready pipe) stay queued as task work until the owner enters
        the kernel asking for events; this is that call.  Returns how many SQEs were submitted;
        the new CQEs are then in `completions`.
        """
        return self._enter(0, get_events=True)

    def _enter(self, wait_nr: int, *, get_events: bool = False) -> int:
        self._check_open()
        # Publish the new tail only now: the SQEs below it are fully written (x86-64 ordering).
        self._sq_tail.value = self._sqe_tail
        flags = ENTER_GETEVENTS if wait_nr > 0 or get_events else 0
        submitted = 0
        while True:
            # Without SQPOLL the kernel moves the SQ head while consuming SQEs inside this call,
            # so head..tail is exactly what it has not taken yet (also after an EINTR).
            head = self._sq_head.value
            to_submit = (self._sqe_tail - head) & _U32_MASK
            ret = _syscall(
                ctypes.c_long(SYS_IO_URING_ENTER),
                ctypes.c_long(self.fd),
                ctypes.c_long(to_submit),
                ctypes.c_long(wait_nr),
                ctypes.c_long(flags),
                None,
                ctypes.c_long(0),
            )
            submitted += (self._sq_head.value - head) & _U32_MASK
            if ret >= 0:
                return submitted
            error = os_error("io_uring_enter")
            if error.errno != errno.EINTR:
                raise error
            if (self._sqe_tail - self._sq_head.value) & _U32_MASK == 0:
                # Only the wait was interrupted: let the caller look at its completions.
                return submitted

    # -- completion ---------------------------------------------------------------------------

    def completions(self) -> list[Completion]:
        """Take every CQE that is ready now (possibly none) and free their ring slots."""
        self._check_open()
        head = self._cq_head.value
        tail = self._cq_tail.value  # read before the CQEs it covers (x86-64 ordering)
        ready: list[Completion] = []
        while head != tail:
            user_data, res, flags = CQE.unpack_from(self._cqes, (head & self._cq_mask) * CQE.size)
            ready.append(Completion(user_data, res, flags))
            head = (head + 1) & _U32_MASK
        self._cq_head.value = head
        return ready

    def wait(self, wait_nr: int = 1) -> list[Completion]:
        """Submit what is pending, wait for ``wait_nr`` CQEs, and return every ready CQE."""
        self.submit_and_wait(wait_nr)
        return self.completions()

    # -- lifetime -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("io_uring is closed")

    def close(self) -> None:
        """Unmap the rings and close the ring fd; the kernel cancels requests still in flight."""
        if self._closed:
            return
        self._closed = True
        for mapping in reversed(self._mappings):
            mapping.close()
        self._mappings.clear()
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
