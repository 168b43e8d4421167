"""The records of format version 1, as `dedupblk.store.upgrade` reads them (the full version-1
specification is the docstring of ``dedupblk/store/format.py`` at the commit that made version 2).

``info``: b"format" -> `FORMAT` (magic, version 1); b"config" -> `CONFIG` (size, page_size,
slot_capacity, max_index_entries, max_share, fingerprint algorithm, uuid) then the backend path;
b"state" -> `STATE` (slot_high, mapped_pages, same_filled_pages, next_seq, clean); b"prealloc" ->
u64. ``map``: page u64be -> `MAP_ENTRY` (kind: 1 slot, 2 fill; the slot or the fill word). ``refs``:
slot u64be -> `REF` (refcount, 16-byte fingerprint). ``index``: fingerprint -> `INDEX_ENTRY` (slot,
age sequence). ``age``, ``free`` and ``deferred`` hold nothing version 2 keeps: a version-2 slot is
free exactly when no page names it.
"""

from __future__ import annotations

import struct

VERSION = 1
DB_NAMES = (b"info", b"map", b"refs", b"index", b"age", b"free", b"deferred")
CONFIG = struct.Struct("<QIQQIB16s")
STATE = struct.Struct("<QQQQB")
MAP_ENTRY = struct.Struct("<BQ")
REF = struct.Struct("<I16s")
INDEX_ENTRY = struct.Struct("<QQ")
U64BE = struct.Struct(">Q")
KIND_SLOT = 1
KIND_FILL = 2
