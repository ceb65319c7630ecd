"""spd-host-molt: MOLT (sparse mixture of linear transforms) for spd-host.

Installing this distribution is all it takes: spd-host finds :mod:`spd_host_molt.plugin` through
the ``spd_host`` entry-point group, and ``molt:<dir>`` IDs work in every command.
"""

__version__ = "0.1.0"
