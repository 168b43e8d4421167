"""Tests that boot a real Linux kernel under qemu (see testbed/vm.py)."""
