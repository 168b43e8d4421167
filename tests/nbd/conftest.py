"""Fixtures of the NBD tier (see nbd_helpers)."""

from .nbd_helpers import nbd_server

__all__ = ["nbd_server"]
