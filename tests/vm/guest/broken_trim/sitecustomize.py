"""A deliberately broken ublk translation, to show that the conformance suite can fail on a real
``/dev/ublkbN``: with this directory on ``PYTHONPATH``, a server's request handler trims one
page past the end of every discard it is sent. Loaded by ``site`` before the server starts; used
only by tests/vm/guest/ublk_checks.py."""

from __future__ import annotations

from typing import Any

from dedupblk.frontends import ublk

_init = ublk.RequestHandler.__init__


class _TrimsOnePageTooMany:
    def __init__(self, device: Any) -> None:
        self._device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)

    def trim(self, offset: int, length: int, **options: Any) -> None:
        end = min(offset + length + 4096, self._device.size)
        self._device.trim(offset, end - offset, **options)


def _broken_init(self: ublk.RequestHandler, device: Any, *args: Any, **kwargs: Any) -> None:
    _init(self, _TrimsOnePageTooMany(device), *args, **kwargs)


ublk.RequestHandler.__init__ = _broken_init
