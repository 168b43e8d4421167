"""Run a shell command inside a throw-away VM with Debian's 6.12 kernel (ublk, zram, 9p).

This machine's kernel has no ublk driver, so tests that need a real ublk (or zram, swap, ext4 on a
block device) boot Debian's ``linux-image-6.12.<N>+deb12-amd64-unsigned`` under ``qemu -accel tcg``
and run one shell command in it. The guest sees this machine's root filesystem read-only, at the
same paths, over 9p: every tool the guest needs (fio, mkswap, python3, the project's venv) is
whatever is installed *here*. In particular a guest command can run
``/work/main/.venv/bin/python -m pytest ...`` (or ``<repo>/.venv/bin/python``, wherever the
checkout is) directly once ``make setup`` has made the venv: no copy, no install in the guest.

Use it from Python::

    from testbed.vm import Harness, run_in_vm

    result = run_in_vm("uname -r; ls /dev/ublk-control")      # fetches and builds on first use
    result.returncode, result.output, result.console

    harness = Harness.prepare()                    # kernel + initramfs once, then many boots
    harness.run(f"{harness.repo_root}/.venv/bin/python -m pytest -q tests/vm/guest", timeout=900)

or from a shell (prints the output, exits with the guest command's status)::

    python -m testbed.vm run -- 'fio --version && cat /proc/swaps'
    python -m testbed.vm run --console --scratch-mb 0 -- 'cat /proc/cmdline'
    python -m testbed.vm prepare           # only fetch the kernel and build the initramfs
    python -m testbed.vm run --scratch-image disk.img --export out/ --kill-after started 10 -- CMD

What the guest command gets:

- ``/bin/sh -c COMMAND`` as root, started in the repository root, stdin from /dev/null, stdout and
  stderr together in ``VMResult.output``; its exit status is ``VMResult.returncode``.
- A clean environment: PATH (system directories only: put ``<repo>/.venv/bin`` first yourself),
  HOME=TMPDIR=/tmp, LANG=C.UTF-8, DEDUPBLK_IN_VM=1, CI copied from the host when set, plus
  whatever ``env=`` adds. Because the tree is read-only, also PYTHONDONTWRITEBYTECODE=1,
  PYTEST_ADDOPTS="-p no:cacheprovider" (else pytest's cache warning is an error under
  ``filterwarnings = error``) and HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis.
- This machine's ``/`` read-only (a guest cannot change the host), with fresh proc, sysfs,
  devtmpfs, devpts and tmpfs on /tmp, /run and /dev/shm. A host /tmp is therefore *not* visible,
  except the repository itself, which is always re-exposed at its own path even when a CI clone
  lives under /tmp. The guest's top directory (``/``) is a writable tmpfs.
- With ``scratch_mb > 0`` (default 512): a sparse raw image, formatted ext4 on the host and
  attached as virtio disk /dev/vda, mounted at ``/scratch``. Stores that back a swap device must
  live there, not on tmpfs (tmpfs can itself be swapped out to the device it backs).
- With ``raw_disk_mb > 0`` (default 0; needs the scratch disk): a second sparse raw image, all
  zeros and unformatted, attached as virtio disk /dev/vdb: a block device for a store's slots.
- With ``scratch_image=PATH`` (an image `make_scratch_image` made, or one an earlier boot left):
  that file is /dev/vda instead of a fresh one, and it is kept. With ``cache=unsafe`` qemu
  writes what the guest wrote to the disk into the image at once (into this machine's page
  cache, which outlives qemu) and ignores the guest's flushes: what the guest had not yet
  written back is lost when qemu is killed, as in a power cut, and the next boot sees the rest.
- With ``export=DIR``: that host directory, writable, at ``/export`` (9p, uncached: a write is
  on the host when it returns, and outlives a killed qemu).
- With ``kill_after=(MARKER, SECONDS)``: qemu gets SIGKILL that many seconds after MARKER first
  appears in the command's output (the guest must flush its stdout). The result then says
  ``killed`` instead of a status; the guest's page cache, and whatever it had not written to its
  disks, is gone.
- Modules already loaded (no modprobe in the guest): ublk_drv, zram (one device, zram0), ext4,
  9p and their dependencies. ``/dev/ublk-control`` exists.

Cost: about 4 s of boot under TCG (no KVM here), 6 s to a finished trivial command; guest code
runs several times slower than on the host, so keep guest workloads small and compare timings only
against something measured in the same guest. Starting Python is slow too (``python3 -c pass``
about 1 s, ``import hypothesis`` about 4 s, a pytest session about 10 s): run many checks per boot
from one interpreter rather than one interpreter per check.

The first use downloads the kernel package (about 100 MB) with ``apt-get download`` and unpacks
it under ``<repo>/.cache/vm/``; later uses touch no network. A file lock makes concurrent first
uses (pytest-xdist workers) safe.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "vm"

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

# The kernel series with the ublk driver this project targets; 6.1 (bookworm's default) has none.
_PACKAGE_PATTERN = r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$"
_PACKAGE_RE = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12-amd64)-unsigned$")
_KERNEL_DIR_RE = re.compile(r"^kernel-6\.12\.(\d+)\+deb12-amd64$")

# Modules the init script loads, in this order, each after its dependencies (read from the
# modules' own .modinfo: the package ships no modules.dep, depmod makes it at install time).
# 9p first (the host root), then the block drivers the tests are about.
GUEST_MODULES: tuple[str, ...] = (
    "netfs",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "virtio_blk",
    "crc32c_generic",  # ext4 and jbd2 need a crc32c: their softdep, loaded explicitly
    "ext4",
    "zram",
    "ublk_drv",
)
# Soft dependencies name aliases that only a full modules.alias could resolve; the few that occur
# in GUEST_MODULES are spelled here. An unknown one fails the initramfs build rather than the boot.
_SOFTDEP_PROVIDERS: dict[str, str] = {
    "crypto-crc32c": "crc32c_generic",
    "crc32c": "crc32c_generic",
}

# Paths whose host content the guest replaces with fresh mounts.
_GUEST_OWNED = (Path("/tmp"), Path("/run"), Path("/dev"), Path("/proc"), Path("/sys"))

_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BOOT_MARKER = re.compile(r"vm-init: job starting at uptime ([0-9.]+)")
_PANIC_MARKER = "Kernel panic - not syncing"
_BOOT_RETRIES = 1  # further boots after a guest kernel panicked before the command started
_TERMINAL_CONTROL = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen
_CONSOLE_TAIL_LINES = 40
_POWER_OFF_GRACE = 10.0  # seconds a guest may take to power off after reporting its status

# PID 1 of the guest (busybox ash). It receives job.conf, keep and job.sh over the writable 9p share
# "vmout" and leaves output and status there. Changing it rebuilds the initramfs.
INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "vm-init: $*"; }
# No sync first: the status is already on the host (9p writes through), and a sync could hang on
# a filesystem over a ublk device whose server died.
halt_now() { poweroff -f; echo o > /proc/sysrq-trigger; while :; do sleep 1; done; }
die() { say "FATAL: $*"; halt_now; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done < /modules.order
# cache=loose: the guest caches the (read-only, short-lived) host tree; a Python import of a
# large package is three to four times faster than with the default cache=none.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
    || die "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmout /out \
    || die "cannot mount the output share (9p tag vmout)"
VM_EXPORT=0
. /out/job.conf

# The new root: a writable tmpfs holding a read-only bind of each top-level host directory.
R=/newroot
mount -t tmpfs -o mode=0755 newroot "$R" || die "cannot mount the root tmpfs"
for p in /host/* /host/.[!.]*; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    n=${p#/host/}
    case "$n" in proc|sys|dev|tmp|run|scratch) continue ;; esac
    [ "$n" = export ] && [ "$VM_EXPORT" = 1 ] && continue
    if [ -L "$p" ]; then
        ln -s "$(readlink "$p")" "$R/$n"
    elif [ -d "$p" ]; then
        mkdir "$R/$n" && mount --bind "$p" "$R/$n" || die "cannot bind /$n"
    fi
done
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/run"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t devtmpfs devtmpfs "$R/dev"
mkdir -p "$R/dev/shm" "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
while read -r p; do
    mkdir -p "$R$p" && mount --bind "/host$p" "$R$p" || die "cannot bind $p"
done < /out/keep
if [ "$VM_SCRATCH" = 1 ]; then
    mkdir "$R/scratch" && mount -t ext4 /dev/vda "$R/scratch" || die "cannot mount /scratch"
fi
if [ "$VM_EXPORT" = 1 ]; then
    mkdir "$R/export" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 export \
        "$R/export" || die "cannot mount /export (9p tag export)"
fi
mkdir "$R/.vm" && cp /out/job.sh "$R/.vm/job.sh" || die "cannot stage the job"

read -r up _ < /proc/uptime
say "job starting at uptime $up"
env -i /bin/chroot "$R" /bin/sh /.vm/job.sh > /out/output 2>&1 < /dev/null
echo $? > /out/status.partial && mv /out/status.partial /out/status
read -r up _ < /proc/uptime
say "job finished at uptime $up"
halt_now
"""

_INITRAMFS_FORMAT = "1"  # bump when the cpio layout built below changes


class VMError(RuntimeError):
    """The VM could not be prepared or booted, or it died before reporting the command's status."""


class VMTimeout(VMError):
    """The VM ran past its timeout and was killed."""


@dataclasses.dataclass(frozen=True)
class KernelImage:
    """An unpacked Debian kernel package: ``root`` holds its boot/ and lib/modules/ trees."""

    release: str  # uname -r, e.g. "6.12.117+deb12-amd64"
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


@dataclasses.dataclass(frozen=True)
class VMResult:
    returncode: int
    output: str  # the command's stdout and stderr, interleaved
    console: str  # the serial console: kernel messages and the init script's progress lines
    elapsed: float  # wall-clock seconds from starting qemu to its exit
    boot_seconds: float | None  # guest uptime when the command started (None if not reported)
    failed_boots: tuple[str, ...] = ()  # panic lines of boots discarded before the command ran
    # qemu got SIGKILL from ``kill_after``: the command never reported a status, returncode is
    # -SIGKILL and output is what it had written until then.
    killed: bool = False


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _cached_kernel() -> KernelImage | None:
    """The newest kernel already unpacked in the cache, if any."""
    if not CACHE_DIR.is_dir():
        return None
    found: list[tuple[int, KernelImage]] = []
    for entry in CACHE_DIR.iterdir():
        match = _KERNEL_DIR_RE.match(entry.name)
        if match is None:
            continue
        kernel = KernelImage(release=entry.name.removeprefix("kernel-"), root=entry)
        if kernel.vmlinuz.is_file() and kernel.modules_dir.is_dir():
            found.append((int(match.group(1)), kernel))
    return max(found, key=lambda item: item[0])[1] if found else None


def _apt_kernel_packages() -> list[str]:
    """Names of the 6.12 kernel packages apt knows of, newest point release first."""
    listing = subprocess.run(
        ["apt-cache", "search", "--names-only", _PACKAGE_PATTERN],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    versions: list[tuple[int, str]] = []
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _PACKAGE_RE.match(name)
        if match is not None:
            versions.append((int(match.group(2)), name))
    return [name for _, name in sorted(versions, reverse=True)]


def _run_tool(argv: Sequence[str], *, cwd: Path | None = None) -> None:
    completed = subprocess.run(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise VMError(
            f"{shlex.join(argv)} exited with {completed.returncode}:\n"
            f"{completed.stdout}{completed.stderr}"
        )


def ensure_kernel() -> KernelImage:
    """Return Debian's newest 6.12 kernel, downloading and unpacking it into the cache once.

    Once a kernel is cached this does no apt call at all, so later runs stay offline and on the
    same kernel; delete ``.cache/vm`` to move to a newer point release.
    """
    cached = _cached_kernel()
    if cached is not None:
        return cached
    with _cache_lock():
        cached = _cached_kernel()  # another process may have finished while we waited
        if cached is not None:
            return cached
        for tool in ("apt-cache", "apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise VMError(f"{tool} not found: the VM kernel comes from Debian's packages")
        packages = _apt_kernel_packages()
        if not packages:
            _run_tool(["apt-get", "update", "-qq"])
            packages = _apt_kernel_packages()
        if not packages:
            raise VMError("apt knows no linux-image-6.12.*+deb12-amd64-unsigned package")
        package = packages[0]
        match = _PACKAGE_RE.match(package)
        assert match is not None
        release = match.group(1)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="download-") as tmp:
            work = Path(tmp)
            _run_tool(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=work
            )
            debs = list(work.glob("*.deb"))
            if len(debs) != 1:
                raise VMError(f"apt-get download {package} left {debs} instead of one .deb")
            tree = work / "tree"
            _run_tool(["dpkg-deb", "-x", str(debs[0]), str(tree)])
            kernel = KernelImage(release=release, root=tree)
            if not kernel.vmlinuz.is_file() or not kernel.modules_dir.is_dir():
                raise VMError(f"{package} has no {kernel.vmlinuz.name} or modules/{release}")
            final = CACHE_DIR / f"kernel-{release}"
            tree.rename(final)  # atomic: a half-unpacked tree is never seen as cached
        return KernelImage(release=release, root=final)


def _elf_modinfo(module: bytes) -> dict[str, list[str]]:
    """The key=value strings of an (uncompressed) ELF64 module's .modinfo section."""
    if module[:4] != b"\x7fELF" or module[4] != 2:
        raise VMError("not an ELF64 kernel module")
    (section_offset,) = struct.unpack_from("<Q", module, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", module, 0x3A)
    sections = [
        struct.unpack_from("<I20xQQ", module, section_offset + i * entry_size) for i in range(count)
    ]
    names_offset = sections[names_index][1]
    info: dict[str, list[str]] = {}
    for name_offset, offset, size in sections:
        start = names_offset + name_offset
        if module[start : module.index(b"\0", start)] != b".modinfo":
            continue
        for field in module[offset : offset + size].split(b"\0"):
            key, sep, value = field.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _module_load_order(kernel: KernelImage, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """``wanted`` plus dependencies, each after what it needs, as (name, uncompressed .ko)."""
    index = {
        path.name.removesuffix(".ko.xz").replace("-", "_"): path
        for path in kernel.modules_dir.rglob("*.ko.xz")
    }
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = {
        Path(line).name.removesuffix(".ko").replace("-", "_")
        for line in builtin_file.read_text().splitlines()
    }
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in visiting:
            raise VMError(f"module dependency cycle through {name}")
        if name not in index:
            raise VMError(f"module {name} (for {wanted_by}) not in {kernel.modules_dir}")
        visiting.add(name)
        image = lzma.decompress(index[name].read_bytes())
        info = _elf_modinfo(image)
        for softdep in info.get("softdep", []):
            # "pre: a b post: c": only "pre" modules must be there before this one loads.
            words = softdep.split()
            pre = words[words.index("pre:") + 1 :] if "pre:" in words else []
            for alias in pre:
                if alias.endswith(":"):
                    break
                provider = _SOFTDEP_PROVIDERS.get(alias, alias)
                if provider.replace("-", "_") not in index and provider not in builtin:
                    raise VMError(f"softdep {alias} of {name}: add it to _SOFTDEP_PROVIDERS")
                visit(provider, name)
        for dependency in ",".join(info.get("depends", [])).split(","):
            if dependency:
                visit(dependency, name)
        visiting.discard(name)
        done.add(name)
        ordered.append((name, image))

    for name in wanted:
        visit(name, "the guest")
    return ordered


class _Cpio:
    """A minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(f"{field:08x}".encode() for field in fields)
        self._chunks += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4)]
        self._chunks += [data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def ensure_initramfs(kernel: KernelImage) -> Path:
    """Build (or reuse) the initramfs for ``kernel``: busybox, the init script, GUEST_MODULES.

    It is uncompressed on purpose: decompressing under TCG costs more boot time than qemu
    spends reading a few extra megabytes.
    """
    if not BUSYBOX.is_file():
        raise VMError(f"{BUSYBOX} not found: install Debian's busybox-static")
    busybox = BUSYBOX.read_bytes()
    key = hashlib.sha256()
    for part in (_INITRAMFS_FORMAT, kernel.release, INIT_SCRIPT, *GUEST_MODULES):
        key.update(part.encode() + b"\0")
    key.update(hashlib.sha256(busybox).digest())
    target = CACHE_DIR / f"initramfs-{kernel.release}-{key.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target
    with _cache_lock():
        if target.is_file():
            return target
        modules = _module_load_order(kernel, GUEST_MODULES)
        cpio = _Cpio()
        for directory in ("bin", "dev", "proc", "sys", "host", "out", "newroot", "lib"):
            cpio.directory(directory)
        cpio.directory("lib/modules")
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", busybox, 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("modules.order", "".join(f"{name}\n" for name, _ in modules).encode())
        for name, image in modules:
            cpio.file(f"lib/modules/{name}.ko", image)
        partial = target.with_suffix(".partial")
        partial.write_bytes(cpio.finish())
        partial.rename(target)
        # Old builds go once they are surely not about to be handed to a qemu starting elsewhere.
        for stale in CACHE_DIR.glob("initramfs-*.cpio"):
            if stale != target and stale.stat().st_mtime < time.time() - 3600:
                stale.unlink(missing_ok=True)
    return target


def _qemu_value(path: Path) -> str:
    """``path`` as the value of a qemu key=value option (a comma is written twice)."""
    return str(path).replace(",", ",,")


def _tail(text: str, lines: int = _CONSOLE_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, indented for an error message."""
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:]) or "  | (nothing)"


def _job_script(command: str, env: Mapping[str, str] | None, cwd: Path) -> str:
    variables = {
        "PATH": _GUEST_PATH,
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        # The host tree is read-only in the guest: tools must not try to write caches into it.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_ADDOPTS": "-p no:cacheprovider",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
        "DEDUPBLK_IN_VM": "1",
    }
    if "CI" in os.environ:
        variables["CI"] = os.environ["CI"]
    variables.update(env or {})
    lines = [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    lines.append(f"exec /bin/sh -c {shlex.quote(command)}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Harness:
    """A prepared kernel and initramfs; ``run`` boots a fresh VM for each command."""

    kernel: KernelImage
    initramfs: Path
    repo_root: Path = REPO_ROOT

    @classmethod
    def prepare(cls) -> Harness:
        """Check qemu is installed, then fetch the kernel and build the initramfs if needed."""
        if shutil.which(QEMU) is None:
            raise VMError(f"{QEMU} not found: install Debian's qemu-system-x86 (make setup)")
        kernel = ensure_kernel()
        return cls(kernel=kernel, initramfs=ensure_initramfs(kernel))

    def qemu_argv(
        self,
        share: Path,
        scratch: Path | None,
        memory_mb: int,
        debug: Debug | None = None,
        raw_disk: Path | None = None,
        monitor: Path | None = None,
        export: Path | None = None,
    ) -> list[str]:
        argv = [
            QEMU,
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "2",
            "-m", str(memory_mb),
            "-nographic",
            "-no-reboot",
            "-nic", "none",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.initramfs),
            "-append",
            "console=ttyS0 quiet panic=-1 sysrq_always_enabled" + (" nokaslr" if debug else ""),
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={_qemu_value(share)},mount_tag=vmout,security_model=none,multidevs=remap",
        ]  # fmt: skip
        if export is not None:
            argv += [
                "-virtfs",
                f"local,path={_qemu_value(export)},mount_tag=export,security_model=none,"
                "multidevs=remap",
            ]
        if debug is not None:
            argv += ["-gdb", f"unix:{_qemu_value(debug.gdb_socket)},server=on,wait=off"]
        if monitor is not None:
            argv += ["-monitor", f"unix:{_qemu_value(monitor)},server=on,wait=off"]
        if scratch is not None:
            argv += [
                "-drive",
                f"file={_qemu_value(scratch)},format=raw,if=virtio,cache=unsafe,discard=unmap",
            ]
        if raw_disk is not None:
            argv += [
                "-drive",
                f"file={_qemu_value(raw_disk)},format=raw,if=virtio,cache=unsafe,discard=unmap",
            ]
        return argv

    def run(
        self,
        command: str,
        *,
        timeout: float = 600,
        memory_mb: int = 2048,
        scratch_mb: int = 512,
        env: Mapping[str, str] | None = None,
        save_console: Path | None = None,
        debug: Debug | None = None,
        raw_disk_mb: int = 0,
        scratch_image: Path | None = None,
        export: Path | None = None,
        kill_after: tuple[str, float] | None = None,
    ) -> VMResult:
        """Boot a VM, run ``command`` with /bin/sh in it, and return its status and output.

        ``save_console``: a file that receives the whole serial console of every boot, whatever
        the outcome (a timed-out guest's hung-task reports are longer than an error's tail).
        ``debug``: boot without KASLR (kernel addresses are the package's System.map) and serve
        qemu's gdb stub on a Unix socket, to look at a hung guest's CPUs from the host.
        ``scratch_image``: boot with this image as /scratch (``scratch_mb`` is then ignored) and
        leave it, changed, for the next boot. ``export``: a host directory the guest writes at
        /export. ``kill_after=(marker, seconds)``: SIGKILL qemu that many seconds after
        ``marker`` appears in the command's output, and return ``killed`` (see the module
        docstring: a power cut).

        Raises VMTimeout (qemu killed) after ``timeout`` seconds, VMError if the guest panicked
        or powered off without reporting a status. Both messages end with the console's tail.

        A guest kernel that panics while booting, before the command started, is booted once more
        (with a fresh scratch disk, or the same ``scratch_image``: nothing of the command's has
        touched it yet). Seen once in CI: ``Oops: int3`` in an initcall while the
        kernel was patching its own text, the trapping byte already back to a nop in memory, which
        points at a vCPU running code another vCPU had just rewritten under TCG. Nothing of ours
        had run yet. The discarded boot is named on stderr and in ``VMResult.failed_boots``; a
        panic after the command started is always an error.
        """
        if scratch_image is not None:
            if not scratch_image.is_file():
                raise VMError(f"scratch image {scratch_image} is not a file (make_scratch_image)")
            scratch_mb = 0
        if raw_disk_mb > 0 and scratch_mb <= 0 and scratch_image is None:
            raise VMError("a raw disk (/dev/vdb) needs the scratch disk (/dev/vda) before it")
        if export is not None and not export.is_dir():
            raise VMError(f"export {export} is not a directory")
        disks = _Disks(scratch_mb, raw_disk_mb, scratch_image, export)
        failed_boots: list[str] = []
        while True:
            result = self._boot(
                command, timeout, memory_mb, disks, env, save_console, debug, kill_after
            )
            panic = [line for line in result.console.splitlines() if _PANIC_MARKER in line]
            if not panic:
                break
            if result.boot_seconds is None and len(failed_boots) < _BOOT_RETRIES:
                failed_boots.append(panic[0].strip())
                print(
                    f"vm harness: the guest kernel panicked before the command started "
                    f"({panic[0].strip()}); booting again. Console tail:\n{_tail(result.console)}",
                    file=sys.stderr,
                )
                continue
            raise VMError(
                f"the guest kernel panicked ({panic[0].strip()}):\n{_tail(result.console)}"
            )
        if result.killed:
            return VMResult(
                returncode=-signal.SIGKILL,
                output=result.output,
                console=result.console,
                elapsed=result.elapsed,
                boot_seconds=result.boot_seconds,
                failed_boots=tuple(failed_boots),
                killed=True,
            )
        if not result.status.isdigit():
            raise VMError(
                f"the VM stopped (qemu exit {result.qemu_exit}) without reporting the command's "
                f"status {result.status!r}:\n{_tail(result.console)}"
            )
        return VMResult(
            returncode=int(result.status),
            output=result.output,
            console=result.console,
            elapsed=result.elapsed,
            boot_seconds=result.boot_seconds,
            failed_boots=tuple(failed_boots),
        )

    def _boot(
        self,
        command: str,
        timeout: float,
        memory_mb: int,
        disks: _Disks,
        env: Mapping[str, str] | None,
        save_console: Path | None = None,
        debug: Debug | None = None,
        kill_after: tuple[str, float] | None = None,
    ) -> _Boot:
        """One VM from start to power-off (or to its SIGKILL by ``kill_after``); VMTimeout if it
        outlives ``timeout``."""
        keep = [
            str(self.repo_root) for owned in _GUEST_OWNED if self.repo_root.is_relative_to(owned)
        ]
        with tempfile.TemporaryDirectory(prefix="dedupblk-vm-") as tmp:
            work = Path(tmp)
            share = work / "share"
            share.mkdir()
            (share / "job.conf").write_text(
                f"VM_SCRATCH={int(disks.scratch_mb > 0 or disks.scratch_image is not None)}\n"
                f"VM_EXPORT={int(disks.export is not None)}\n"
            )
            (share / "keep").write_text("".join(f"{path}\n" for path in keep))
            (share / "job.sh").write_text(_job_script(command, env, self.repo_root))
            scratch, raw_disk = disks.scratch_image, None
            if disks.scratch_mb > 0:
                scratch = work / "scratch.img"
                _make_scratch_image(scratch, disks.scratch_mb)
            if disks.raw_disk_mb > 0:
                raw_disk = work / "raw.img"
                _make_sparse_image(raw_disk, disks.raw_disk_mb)
            console_path = work / "console.log"
            monitor = work / "monitor.sock"
            started = time.monotonic()
            with console_path.open("wb") as console_file:
                qemu = subprocess.Popen(
                    self.qemu_argv(
                        share, scratch, memory_mb, debug, raw_disk, monitor, disks.export
                    ),
                    stdin=subprocess.DEVNULL,
                    stdout=console_file,
                    stderr=subprocess.STDOUT,
                )
                dumped = False
                kill = _KillAfterMarker(share / "output", *kill_after) if kill_after else None
                try:
                    outcome = _wait_for_guest(qemu, share / "status", timeout, kill)
                    finished = outcome != _TIMED_OUT
                    # A command that hangs, not a boot that did (that console says enough).
                    if (
                        not finished
                        and qemu.poll() is None
                        and _BOOT_MARKER.search(_read_console(console_path))
                    ):
                        dumped = _ask_for_stacks(monitor)
                finally:
                    if qemu.poll() is None:  # timed out, hung at power-off, or ^C
                        qemu.kill()
                        qemu.wait()
                    if save_console is not None:
                        with save_console.open("ab") as saved:
                            saved.write(console_path.read_bytes())
            if not finished:
                output = _read_optional(share / "output")
                raise VMTimeout(
                    f"VM still running after {timeout:g} s, killed.\n"
                    f"command output so far (tail):\n{_tail(output, 20)}\n"
                    f"console (tail{', after SysRq dumps' if dumped else ''}):\n"
                    f"{_tail(_read_console(console_path), _TIMEOUT_CONSOLE_LINES)}"
                )
            console = _read_console(console_path)
            boot = _BOOT_MARKER.search(console)
            return _Boot(
                status=_read_optional(share / "status").strip(),
                output=_read_optional(share / "output"),
                console=console,
                elapsed=time.monotonic() - started,
                boot_seconds=float(boot.group(1)) if boot else None,
                qemu_exit=qemu.returncode,
                killed=outcome == _KILLED,
            )


@dataclasses.dataclass(frozen=True)
class Debug:
    """How to boot a guest for inspection (see `Harness.run`)."""

    gdb_socket: Path


@dataclasses.dataclass(frozen=True)
class _Disks:
    """Sizes of the disks each boot gets afresh (0: none), the scratch image to use instead of
    a fresh one, and the host directory exported at /export."""

    scratch_mb: int
    raw_disk_mb: int
    scratch_image: Path | None = None
    export: Path | None = None


@dataclasses.dataclass(frozen=True)
class _Boot:
    """What one qemu run left behind."""

    status: str  # the command's exit status as the guest wrote it ("" if it never did)
    output: str
    console: str
    elapsed: float
    boot_seconds: float | None  # None: the command never started
    qemu_exit: int
    killed: bool = False  # by ``kill_after``


# SysRq keys pressed (through qemu's monitor) in a guest that outlived its timeout, so that its
# kernel prints on the console what it is doing: 9 = every message level to the console (the
# guest boots "quiet"), w = every task in uninterruptible sleep with its stack, l = a backtrace
# of every CPU, m = memory.  Keyboard SysRq needs no task of the guest to run, which a guest
# hung in memory reclaim may not manage.
_SYSRQ_KEYS = ("9", "w", "l", "m")
_SYSRQ_SETTLE = 12.0  # seconds for the dumps to reach the serial console under TCG
_TIMEOUT_CONSOLE_LINES = 250


def _ask_for_stacks(monitor: Path) -> bool:
    """Press the `_SYSRQ_KEYS` in the guest and give its console time to print the dumps.
    False if qemu's monitor could not be reached."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hmp:
            hmp.settimeout(5)
            hmp.connect(str(monitor))
            for key in _SYSRQ_KEYS:
                hmp.sendall(f"sendkey alt-sysrq-{key}\n".encode())
                time.sleep(1)
    except OSError as exc:
        print(f"vm harness: no SysRq dump ({exc})", file=sys.stderr)
        return False
    time.sleep(_SYSRQ_SETTLE)
    return True


class _KillAfterMarker:
    """When to SIGKILL qemu: ``delay`` seconds after ``marker`` first appears in ``output`` (the
    command's output file, which the guest appends to over 9p). Reads only what was appended
    since the last look; a marker split across two appends is still found."""

    def __init__(self, output: Path, marker: str, delay: float) -> None:
        if not marker:
            raise VMError("kill_after needs a non-empty marker")
        self._output = output
        self._marker = marker.encode()
        self._delay = delay
        self._offset = 0
        self._carry = b""  # the end of what was read, in case the marker straddles two reads
        self.kill_at: float | None = None  # set once the marker was seen

    def due(self, now: float) -> bool:
        if self.kill_at is None:
            if not self._marker_seen():
                return False
            self.kill_at = now + self._delay
        return now >= self.kill_at

    def _marker_seen(self) -> bool:
        try:
            with self._output.open("rb") as output:
                output.seek(self._offset)
                chunk = output.read()
        except FileNotFoundError:
            return False
        self._offset += len(chunk)
        window = self._carry + chunk
        if self._marker in window:
            return True
        self._carry = window[len(window) - len(self._marker) + 1 :]
        return False


# What `_wait_for_guest` saw.
_FINISHED = "finished"  # qemu exited, or the guest reported its status
_TIMED_OUT = "timed out"
_KILLED = "killed"  # by a `_KillAfterMarker`


def _wait_for_guest(
    qemu: subprocess.Popen[bytes],
    status: Path,
    timeout: float,
    kill: _KillAfterMarker | None = None,
) -> str:
    """Wait until qemu exits or, once the guest has written ``status``, a short grace period.

    `_TIMED_OUT` if ``timeout`` passed first. A guest that reported its status but does not
    power off (a device hung at shutdown) costs the grace period, not the whole timeout. With
    ``kill``, qemu gets SIGKILL when it is due (unless the status came first): `_KILLED`.
    """
    deadline = time.monotonic() + timeout
    power_off_deadline: float | None = None
    while qemu.poll() is None:
        now = time.monotonic()
        if power_off_deadline is None and status.exists():
            power_off_deadline = now + _POWER_OFF_GRACE
        if power_off_deadline is not None and now > power_off_deadline:
            return _FINISHED
        if power_off_deadline is None and kill is not None and kill.due(now):
            qemu.kill()
            qemu.wait()
            return _KILLED
        if now > deadline:
            return _FINISHED if status.exists() else _TIMED_OUT
        time.sleep(0.1)
    return _FINISHED


def _make_sparse_image(path: Path, size_mb: int) -> None:
    """A raw image of ``size_mb`` MiB of zeros that takes no space until written."""
    with path.open("wb") as image:
        image.truncate(size_mb << 20)


def make_scratch_image(path: Path, size_mb: int) -> None:
    """Make ``path`` a sparse raw image of ``size_mb`` MiB holding an empty ext4, for
    ``Harness.run(scratch_image=path)``: boots that use it in turn see each other's writes."""
    _make_scratch_image(path, size_mb)


def _make_scratch_image(path: Path, size_mb: int) -> None:
    """A sparse raw image holding an empty ext4 (formatted here: mke2fs under TCG is slower)."""
    _make_sparse_image(path, size_mb)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    # Inode tables and journal zeroed now (cheap on a sparse file), so no ext4lazyinit thread
    # writes in the background of a guest benchmark.
    argv = [mkfs, "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)]
    _run_tool(argv)


def _read_console(path: Path) -> str:
    return _TERMINAL_CONTROL.sub("", path.read_text(errors="replace"))


def _read_optional(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_in_vm(
    command: str,
    *,
    timeout: float = 600,
    memory_mb: int = 2048,
    scratch_mb: int = 512,
    env: dict[str, str] | None = None,
    raw_disk_mb: int = 0,
    scratch_image: Path | None = None,
    export: Path | None = None,
    kill_after: tuple[str, float] | None = None,
) -> VMResult:
    """Prepare the harness if needed and run ``command`` in a fresh VM (see ``Harness.run``)."""
    return Harness.prepare().run(
        command,
        timeout=timeout,
        memory_mb=memory_mb,
        scratch_mb=scratch_mb,
        env=env,
        raw_disk_mb=raw_disk_mb,
        scratch_image=scratch_image,
        export=export,
        kill_after=kill_after,
    )


def _kill_after(words: list[str]) -> tuple[str, float]:
    marker, seconds = words
    try:
        return marker, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill-after: {seconds!r} is not seconds") from None


def _env_pair(pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {pair!r}")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.vm",
        description="Boot Debian's 6.12 kernel under qemu and run one shell command in it. "
        "Exits with the command's status, or 125 if the VM itself failed.",
    )
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("prepare", help="fetch the kernel and build the initramfs, then exit")
    run = commands.add_parser("run", help="run a shell command in a fresh VM")
    run.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    run.add_argument("--memory-mb", type=int, default=2048)
    run.add_argument("--scratch-mb", type=int, default=512, help="ext4 /scratch size, 0 for none")
    run.add_argument("--raw-disk-mb", type=int, default=0, help="unformatted /dev/vdb, 0 for none")
    run.add_argument(
        "--scratch-image",
        type=Path,
        metavar="FILE",
        help="use (and keep) this image as /scratch; made with --scratch-mb MiB if missing",
    )
    run.add_argument("--export", type=Path, metavar="DIR", help="host DIR, writable, at /export")
    run.add_argument(
        "--kill-after",
        nargs=2,
        metavar=("MARKER", "SECONDS"),
        help="SIGKILL qemu SECONDS after MARKER appears in the output (exit 137)",
    )
    run.add_argument(
        "-e", "--env", action="append", default=[], type=_env_pair, metavar="NAME=VALUE"
    )
    run.add_argument("--console", action="store_true", help="print the console log to stderr")
    run.add_argument(
        "--save-console", type=Path, metavar="FILE", help="append every boot's console to FILE"
    )
    run.add_argument(
        "--gdb",
        type=Path,
        metavar="SOCKET",
        help="no KASLR, qemu's gdb stub on a Unix socket (qemu is still killed at --timeout)",
    )
    run.add_argument("command", nargs="+", help="shell command (words are joined by spaces)")
    args = parser.parse_args(argv)
    try:
        harness = Harness.prepare()
        if args.action == "prepare":
            print(f"kernel {harness.kernel.release}: {harness.kernel.vmlinuz}")
            print(f"initramfs: {harness.initramfs}")
            return 0
        if args.scratch_image is not None and not args.scratch_image.exists():
            make_scratch_image(args.scratch_image, args.scratch_mb)
        result = harness.run(
            " ".join(args.command),
            timeout=args.timeout,
            memory_mb=args.memory_mb,
            scratch_mb=args.scratch_mb,
            env=dict(args.env),
            save_console=args.save_console,
            debug=Debug(args.gdb) if args.gdb else None,
            raw_disk_mb=args.raw_disk_mb,
            scratch_image=args.scratch_image,
            export=args.export,
            kill_after=_kill_after(args.kill_after) if args.kill_after else None,
        )
    except (VMError, argparse.ArgumentTypeError) as error:
        print(f"vm harness: {error}", file=sys.stderr)
        return 125
    if args.console:
        sys.stderr.write(result.console)
    sys.stdout.write(result.output)
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "?"
    end = "killed (SIGKILL)" if result.killed else f"exit {result.returncode}"
    print(f"vm harness: {end}, boot {boot}, total {result.elapsed:.1f} s", file=sys.stderr)
    return 128 + signal.SIGKILL if result.killed else result.returncode


if __name__ == "__main__":
    sys.exit(main())
