"""`create --backend` never takes someone else's data: a filesystem, a partition table, swap, a
mounted device, a file with data, another store's files. Each refusal names what was found and
leaves the backend untouched; ``--overwrite-backend`` says in words that it may be destroyed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from dedupblk.cli import main
from dedupblk.errors import BackendMismatch
from dedupblk.store import create_store, open_store
from tests.conftest import SMALL

P = 4096


def _image(path: Path, mib: int = 8) -> Path:
    with path.open("wb") as f:
        f.truncate(mib << 20)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ext4(path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)


def _swap(path: Path) -> None:
    os.chmod(path, 0o600)
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)


def _gpt(path: Path) -> None:
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\n", text=True, check=True)


def _lvm(path: Path) -> None:
    # pvcreate writes its label on a block device only: a loop device over the file.
    _need_root()
    device = _loop(path)
    try:
        subprocess.run(["pvcreate", "-q", device], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: the block-device claims must be tested")
        pytest.skip("needs root (losetup, mount)")


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (_ext4, "an ext4 filesystem"),
        (_swap, "swap space"),
        (_gpt, "a gpt partition table"),
        (_lvm, "an LVM physical volume"),
    ],
    ids=["ext4", "swap", "gpt", "lvm"],
)
def test_a_file_with_a_signature_is_refused_by_name(
    tmp_path: Path, make: Callable[[Path], None], found: str
) -> None:
    image = _image(tmp_path / "disk.img")
    make(image)
    before = _digest(image)
    result = CliRunner().invoke(main, ["create", str(tmp_path / "s"), "--size", "1M",
                                       "--backend", str(image)])  # fmt: skip
    assert result.exit_code == 1
    assert f"holds {found}: give --overwrite-backend" in result.stderr
    assert result.stderr.count("\n") == 1
    assert _digest(image) == before
    assert not (tmp_path / "s").exists()
    create_store(str(tmp_path / "t"), SMALL, backend=str(image), overwrite_backend=True)
    with open_store(tmp_path / "t") as store:
        store.write(0, b"\x01" * 7 + b"\x02" + bytes(P - 8))
        store.flush()


def test_a_file_with_data_is_refused_and_an_empty_one_taken(tmp_path: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("someone's notes\n")
    with pytest.raises(BackendMismatch, match="existing file of 16 bytes that is not dedupblk"):
        create_store(str(tmp_path / "s"), SMALL, backend=str(data))
    assert data.read_text() == "someone's notes\n"
    empty = tmp_path / "empty"
    empty.touch()
    create_store(str(tmp_path / "t"), SMALL, backend=str(empty))


def test_another_stores_files_are_never_a_backend(tmp_path: Path) -> None:
    other = tmp_path / "other"
    create_store(str(other), SMALL)
    for name in ("meta/data.mdb", "meta/lock.mdb", "lock", "slots"):
        with pytest.raises(BackendMismatch, match="inside the store"):
            create_store(str(tmp_path / "s"), SMALL, backend=str(other / name),
                         overwrite_backend=True)  # fmt: skip
    with open_store(other) as store:
        assert store.check().problems == []


def test_a_store_is_never_made_inside_another(tmp_path: Path) -> None:
    other = tmp_path / "other"
    create_store(str(other), SMALL)
    result = CliRunner().invoke(main, ["create", str(other / "meta" / "x"), "--size", "1M"])
    assert result.exit_code != 0 and "inside the store" in result.stderr


def _loop(image: Path) -> str:
    done = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def test_a_block_device_with_a_filesystem_or_mounted_is_refused(tmp_path: Path) -> None:
    _need_root()
    image = _image(tmp_path / "disk.img")
    _ext4(image)
    device = _loop(image)
    mount = tmp_path / "mnt"
    mount.mkdir()
    try:
        with pytest.raises(BackendMismatch, match="holds an ext4 filesystem"):
            create_store(str(tmp_path / "a"), SMALL, backend=device)
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            (mount / "file").write_text("kept\n")
            for overwrite in (False, True):
                with pytest.raises(BackendMismatch, match="mounted or held open exclusively"):
                    create_store(str(tmp_path / "b"), SMALL, backend=device,
                                 overwrite_backend=overwrite)  # fmt: skip
        finally:
            subprocess.run(["umount", str(mount)], check=True)
        subprocess.run(["e2fsck", "-fn", device], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_a_block_device_held_open_exclusively_is_refused(tmp_path: Path) -> None:
    # Nothing on it to find, nothing mounted: only someone holding it with O_EXCL (as mkfs, a
    # device-mapper table or another dedupblk server would).
    _need_root()
    image = _image(tmp_path / "disk.img")
    device = _loop(image)
    try:
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)
        try:
            for overwrite in (False, True):
                with pytest.raises(BackendMismatch, match="mounted or held open exclusively"):
                    create_store(str(tmp_path / "s"), SMALL, backend=device,
                                 overwrite_backend=overwrite)  # fmt: skip
        finally:
            os.close(holder)
        create_store(str(tmp_path / "s"), SMALL, backend=device)  # free again: taken
        with open_store(tmp_path / "s") as store:
            store.write(0, b"\x03" * P)
            store.flush()
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
