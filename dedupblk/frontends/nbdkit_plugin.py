"""nbdkit entry point for dedupblk: serve a store over NBD.

    nbdkit python dedupblk/frontends/nbdkit_plugin.py store=STORE [size=SIZE] [readonly=true] ...
    nbdkit python dedupblk/frontends/nbdkit_plugin.py --dump-plugin    # lists the parameters

Its parameters are listed in `dedupblk.nbd.params`. ``dedupblk serve STORE`` runs this for you,
with the store as a plain argument, a private socket and a clean stop.

What nbdkit 1.32's Python plugin (nbdkit-python-plugin(3), Debian 12) allows, checked here:

- ``--dump-plugin`` loads this file and passes every ``key=value`` to `config`, but calls neither
  config_complete nor get_ready, so it needs no store and works from any directory. After
  nbdkit's own lines it calls `dump_plugin`, which adds ``dedupblk_version=`` and one
  ``dedupblk_parameter_KEY=HELP`` line per parameter.
- ``--help`` cannot show these parameters: nbdkit answers it before it loads this file, with the
  Python plugin's fixed text (``script=<FILENAME> (required) The Python plugin to run.`` and
  ``[other arguments may be used by the plugin that you load]``). The Python plugin reads no
  config_help from a script; ``--dump-plugin`` is where the parameters are listed.
- No magic config key: the Python plugin reads no magic_config_key either, so nbdkit takes only
  the first bare word (this file) as ``script=``, and ``nbdkit python PLUGIN /path/to/store``
  fails with ``nbdkit: expecting key=value on the command line but got: /path/to/store``. Spell
  ``store=PATH``; only ``dedupblk serve`` takes the store positionally.
- `export_description` gives the export a description, which ``nbdinfo URI`` shows as
  ``description: dedupblk store PATH (SIZE, format N)``.

nbdkit runs this file as `__main__` in its embedded interpreter, Debian's /usr/bin/python3, whose
`sys.path` has neither this repository nor the project's venv. So before importing dedupblk, the
top level adds the directory that holds the `dedupblk` package and, if there is one, the
repository's `.venv` site-packages (`dedupblk serve` also sets PYTHONPATH, which makes both
no-ops). All logic is in `dedupblk.nbd.adapter`; this file only binds one adapter's methods to
the names nbdkit looks up.
"""

from __future__ import annotations

import glob
import os
import site
import sys


def _extend_path() -> None:
    # __file__ exists only while this top level runs (nbdkit loads it with PyRun_SimpleFile).
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if package_root not in sys.path:
        sys.path.insert(0, package_root)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for venv_site in glob.glob(
        os.path.join(package_root, ".venv", "lib", version, "site-packages")
    ):
        if venv_site not in sys.path:
            site.addsitedir(venv_site)  # also runs its .pth files (the editable install's)


_extend_path()

import nbdkit  # noqa: E402  (exists only inside nbdkit, after the path is set up)

from dedupblk.libc import libc  # noqa: E402
from dedupblk.nbd.adapter import NbdkitPlugin  # noqa: E402
from dedupblk.nbd.params import exit_on_parameter_error  # noqa: E402

# Deliberate errors (a bad parameter, ENOSPC, ...) are one line in nbdkit's log; unexpected ones
# carry their own formatted traceback (NbdkitPlugin.failure), which this setting does not cut.
sys.tracebacklimit = 0

API_VERSION = 2

# nbdkit calls module-level names, so the one plugin instance has to live at module level.
_plugin = NbdkitPlugin(nbdkit)

config = exit_on_parameter_error(_plugin.config)
config_complete = exit_on_parameter_error(_plugin.config_complete)
thread_model = _plugin.thread_model
get_ready = exit_on_parameter_error(_plugin.get_ready)
after_fork = _plugin.after_fork
cleanup = _plugin.cleanup
open = _plugin.open  # nbdkit's callback name; shadows the builtin only in this module
get_size = _plugin.get_size
export_description = _plugin.export_description
block_size = _plugin.block_size
can_write = _plugin.can_write
can_flush = _plugin.can_flush
can_trim = _plugin.can_trim
can_zero = _plugin.can_zero
can_fast_zero = _plugin.can_fast_zero
can_extents = _plugin.can_extents
can_multi_conn = _plugin.can_multi_conn
can_fua = _plugin.can_fua
is_rotational = _plugin.is_rotational
pread = _plugin.pread
pwrite = _plugin.pwrite
flush = _plugin.flush
trim = _plugin.trim
zero = _plugin.zero
extents = _plugin.extents


def dump_plugin() -> None:
    """Called by ``--dump-plugin`` after nbdkit's own lines; prints this plugin's."""
    # nbdkit printed its lines through C stdio, which buffers them when stdout is a pipe: flush
    # them first, or these would come out before them.
    libc.fflush(None)
    for line in _plugin.dump_plugin():
        print(line, flush=True)
