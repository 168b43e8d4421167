"""What the tests and the benchmarks both stand on, outside either: `vm` boots Debian's 6.12
kernel under qemu and runs a command in it (ublk, zram, swap, power cuts); `vcpu_stacks` samples
a hung guest's vCPUs. Neither is part of the product (``dedupblk/``)."""
