"""What nbdinfo sees: the extents map and the advertised sizes and capabilities."""

from __future__ import annotations

import json

import nbd
import pytest

from dedupblk.nbd.adapter import MAXIMUM_BLOCK_SIZE, PREFERRED_BLOCK_SIZE

from .nbd_helpers import PAGE_SIZE, ServerFactory, run

pytestmark = pytest.mark.nbd

SIZE = 4 << 20


def test_map_shows_holes_for_unmapped_pages_and_data_elsewhere(nbd_server: ServerFactory) -> None:
    server = nbd_server(SIZE)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"\x01" * 3 + bytes(PAGE_SIZE - 3), 1 * PAGE_SIZE)  # data
    h.pwrite(b"\x5a" * (2 * PAGE_SIZE), 4 * PAGE_SIZE)  # same-filled pages are mapped: data
    h.pwrite(bytes(PAGE_SIZE), 6 * PAGE_SIZE)  # zeros written: a hole
    h.pwrite(b"\x07" * PAGE_SIZE, 8 * PAGE_SIZE)
    h.trim(PAGE_SIZE, 8 * PAGE_SIZE)  # trimmed again: a hole
    h.pwrite(b"\x09" * PAGE_SIZE, 9 * PAGE_SIZE)
    h.flush()
    h.shutdown()
    result = run("nbdinfo", "--map", "--json", server.uri)
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(result.stdout)]
    assert extents == [
        (0, PAGE_SIZE, 3),
        (PAGE_SIZE, PAGE_SIZE, 0),
        (2 * PAGE_SIZE, 2 * PAGE_SIZE, 3),
        (4 * PAGE_SIZE, 2 * PAGE_SIZE, 0),
        (6 * PAGE_SIZE, 3 * PAGE_SIZE, 3),
        (9 * PAGE_SIZE, PAGE_SIZE, 0),
        (10 * PAGE_SIZE, SIZE - 10 * PAGE_SIZE, 3),
    ]


def test_block_sizes_and_capabilities_are_advertised(nbd_server: ServerFactory) -> None:
    server = nbd_server(SIZE)
    export = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert export["export-size"] == SIZE
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (PAGE_SIZE, PREFERRED_BLOCK_SIZE, MAXIMUM_BLOCK_SIZE)
    claimed = {key: export[key] for key in export if key.startswith(("can_", "is_"))}
    assert claimed == {
        "can_cache": False,
        "can_df": True,
        "can_fast_zero": True,
        "can_flush": True,
        "can_fua": True,
        "can_multi_conn": True,
        "can_trim": True,
        "can_zero": True,
        "is_read_only": False,
        "is_rotational": False,
    }


def test_readonly_export_is_advertised_read_only(nbd_server: ServerFactory) -> None:
    server = nbd_server(SIZE, params=["readonly=true"])
    export = json.loads(run("nbdinfo", "--json", server.uri).stdout)["exports"][0]
    assert export["is_read_only"] is True
