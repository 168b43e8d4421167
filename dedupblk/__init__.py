"""dedupblk: a deduplicating block device (ublk and nbdkit frontends) over an LMDB-backed store."""

__version__ = "0.1.0"
