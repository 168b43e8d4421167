"""A real filesystem image for the estimate tests: ``mkfs.ext4 -d`` over a copy of system files
(``/usr/share/doc``, topped up from Python's standard library where that is small), so the image
holds what disks hold: many small files, some identical (licence texts), inode tables, a journal,
free space never written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

SOURCES = ("/usr/share/doc", sysconfig.get_paths()["stdlib"])


def copy_system_files(target: Path, budget: int) -> int:
    """Copy regular files from `SOURCES`, in sorted order, until ``budget`` bytes; returns the
    bytes copied."""
    copied = 0
    for source in SOURCES:
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                size = os.path.getsize(path)
                if copied + size > budget or not os.access(path, os.R_OK):
                    continue
                where = target / os.path.basename(source) / os.path.relpath(root, source)
                where.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, where / name)
                copied += size
    return copied


def ext4_image(tmp_path: Path, *, size: int = 64 << 20, files: int = 24 << 20) -> Path:
    """An ext4 image of ``size`` bytes holding about ``files`` bytes of system files."""
    if shutil.which("mkfs.ext4") is None:
        if os.environ.get("CI"):
            pytest.fail("CI has e2fsprogs (make setup): the filesystem image must be tested")
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    tree = tmp_path / "tree"
    tree.mkdir()
    copied = copy_system_files(tree, files)
    assert copied > files // 2, f"only {copied} bytes of system files to copy"
    image = tmp_path / "ext4.img"
    with image.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    shutil.rmtree(tree)
    return image
