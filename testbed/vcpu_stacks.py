"""What the vCPUs of a hung guest are running, from the host (a diagnosis tool, not a test).

Boot the guest with ``python -m testbed.vm run --gdb SOCKET ...`` (no KASLR, qemu's gdb
stub); while it hangs, run::

    python -m testbed.vcpu_stacks SOCKET [--samples 5]

For each sample and each vCPU it prints the instruction pointer (a kernel symbol, or "user
mode") and the kernel text addresses found on the stack, innermost first: a heuristic backtrace
(stale return addresses can appear), enough to tell reclaim from an idle CPU or a spinning
server.  Kernel symbols come from the guest's /proc/kallsyms, read once by booting a small guest
without KASLR and cached in .cache/vm/ (Debian ships no real System.map).
"""

from __future__ import annotations

import argparse
import bisect
import re
import subprocess
import sys
import time
from pathlib import Path

from .vm import CACHE_DIR, Debug, Harness

_STACK_WORDS = 600
_MAX_FRAMES = 40


class Symbols:
    """Kernel text symbols by address."""

    def __init__(self, kallsyms: str) -> None:
        table: list[tuple[int, str]] = []
        for line in kallsyms.splitlines():
            parts = line.split()
            if len(parts) >= 3 and len(parts[0]) == 16 and parts[1] in "tTwW":
                table.append((int(parts[0], 16), parts[2]))
        if not table:
            raise SystemExit("no kernel text symbols (was kallsyms read as root, without KASLR?)")
        table.sort()
        end = [address for address, name in table if name == "_etext"]
        if end:  # nothing past the end of kernel text (data would read as _etext+offset)
            table = [(address, name) for address, name in table if address < end[0]]
        self.addresses = [address for address, _ in table]
        self.names = [name for _, name in table]

    def name(self, address: int) -> str | None:
        """``symbol+offset`` for an address in kernel text, else None."""
        if not self.addresses[0] <= address <= self.addresses[-1]:
            return None
        i = bisect.bisect_right(self.addresses, address) - 1
        return f"{self.names[i]}+{address - self.addresses[i]:#x}"


def kernel_symbols(harness: Harness) -> Symbols:
    cached = CACHE_DIR / f"kallsyms-{harness.kernel.release}-nokaslr.txt"
    if not cached.is_file():
        socket = CACHE_DIR / "kallsyms-gdb.sock"
        result = harness.run("cat /proc/kallsyms", scratch_mb=0, memory_mb=512, debug=Debug(socket))
        if result.returncode != 0:
            raise SystemExit(f"reading the guest's kallsyms failed: {result.output[-500:]}")
        cached.write_text(result.output)
    return Symbols(cached.read_text())


def _gdb(socket: Path, *commands: str) -> str:
    argv = ["gdb", "-batch", "-nx"]
    for command in ("set pagination off", "set architecture i386:x86-64",
                    f"target remote {socket}", *commands):  # fmt: skip
        argv += ["-ex", command]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout


def sample(socket: Path, symbols: Symbols) -> None:
    threads = len(re.findall(r"^\*?\s+\d+\s+Thread", _gdb(socket, "info threads"), re.M))
    for thread in range(1, threads + 1):
        out = _gdb(socket, f"thread {thread}", "info registers rip cs",
                   f"x/{_STACK_WORDS}gx $rsp")  # fmt: skip
        rip = re.search(r"^rip\s+(0x[0-9a-f]+)", out, re.M)
        cs = re.search(r"^cs\s+(0x[0-9a-f]+)", out, re.M)
        address = int(rip.group(1), 16) if rip else 0
        user = cs is not None and int(cs.group(1), 16) & 3 == 3
        where = "user mode" if user else (symbols.name(address) or "?")
        print(f"vCPU {thread - 1}: {rip.group(1) if rip else '?'} {where}")
        if user:
            continue
        # x/gx lines: "0xffffc90000bfbd98:\t0xffffffff81234567\t0x0000000000000000"
        words = [w for line in out.splitlines() if re.match(r"^0x[0-9a-f]+.*:\s", line)
                 for w in re.findall(r"0x[0-9a-f]{16}", line.split(":", 1)[1])]  # fmt: skip
        frames = 0
        for word in words:
            name = symbols.name(int(word, 16))
            if name and not name.startswith("__pfx_") and not name.endswith("+0x0"):
                print(f"    {name}")
                frames += 1
                if frames >= _MAX_FRAMES:
                    break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.vcpu_stacks", description=__doc__)
    parser.add_argument("socket", type=Path, help="the --gdb socket of the running guest")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    args = parser.parse_args(argv)
    symbols = kernel_symbols(Harness.prepare())
    for n in range(args.samples):
        print(f"--- sample {n + 1} at {time.strftime('%H:%M:%S')}")
        sample(args.socket, symbols)
        time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
