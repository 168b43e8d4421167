"""The kernel's ublk interface, one concern per module (docs/ublk.md tells the whole story).

Each module imports only those listed before it: `abi` (records and codes) and `uring` (the
ctypes io_uring), `hardening` (keeping the server out of reclaim), `placement` (where a swap
store may live, and the swap tools), `control` (``/dev/ublk-control`` and the device list),
`queue` (one hardware queue's ring loop, apart from the handler that answers its requests) and
`server` (a device's life cycle and signals).  Nothing here imports the store or a frontend;
``dedupblk.frontends.ublk`` joins them.
"""
