"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram per call.

A service of ``Type=notify`` is started with ``NOTIFY_SOCKET`` naming an AF_UNIX datagram
socket: a path, or an abstract name written with a leading ``@``. The service sends
newline-separated ``KEY=value`` assignments to it: ``READY=1`` once it serves (systemd holds
back the units ordered after it until then), ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` when it begins to stop. Without ``NOTIFY_SOCKET`` (not started by systemd, or
not as ``Type=notify``) nothing is sent.

A failed send is logged, not raised: a server that serves must not stop because systemd could
not be told. With ``NotifyAccess=main`` (the default) systemd accepts datagrams only from the
service's main process, so the server sends them itself.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one datagram to
    ``$NOTIFY_SOCKET``; True if it was sent, False if there is no socket or sending failed."""
    address = os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        log.warning("%s=%s: not a Unix socket path; systemd not notified", NOTIFY_SOCKET, address)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc.strerror or exc)
        return False
    return True
