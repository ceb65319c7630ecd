"""The host's built-in eval-suite plugin: the suites spd-host ships.

Registered by :class:`spd_host.plugins.PluginHost` before any entry point (``BUILTIN_PLUGINS``),
through the same ``register_eval_suites`` hook a third-party package uses; registering a suite
of the same name from a plugin replaces the built-in one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spd_host.hookspecs import hookimpl


@hookimpl
def register_eval_suites(register: Callable[[Any], None]) -> None:
    from spd_host.evals.suites import builtin_suites

    for suite in builtin_suites():
        register(suite)
