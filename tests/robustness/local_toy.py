"""The harvest tests' toy method under a local-path ID (``ltoy:/some/dir``), so that the run
key can fingerprint a decomposition directory the test controls."""

from __future__ import annotations

from typing import Any

from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl
from tests.harvest import toy_plugin

METHOD = MethodInfo(name="ltoy", description="The toy method, loaded from a local directory.")


@hookimpl
def register_methods(register: Any) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: Any) -> Any:
    if decomposition_id.method != "ltoy":
        return None
    return toy_plugin.ToyAdapter(decomposition_id=decomposition_id.normalized, method=METHOD)


@hookimpl
def harvest_fn(adapter: Any, options: Any) -> Any:
    if adapter.method.name != "ltoy":
        return None
    return toy_plugin.toy_harvest_fn(options.threshold)
