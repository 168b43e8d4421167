"""The NBD side, served by nbdkit: `params` (the plugin's ``key=value`` parameters), `adapter`
(nbdkit's callbacks translated into device calls) and `launcher` (``dedupblk serve --frontend
nbd``, which runs nbdkit). nbdkit itself runs `dedupblk/frontends/nbdkit_plugin.py`."""
