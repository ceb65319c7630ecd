"""Look up providers and strategies registered through the plugin hooks.

A later-registered plugin wins a name clash (entry points register after the host's built-ins),
so a package can replace a built-in provider or strategy. Objects of the wrong type are a
``PluginError`` naming the plugin.
"""

from __future__ import annotations

import os

from spd_host.autointerp.providers.base import Provider
from spd_host.autointerp.strategies.base import Strategy
from spd_host.errors import ConfigError, PluginError
from spd_host.plugins import PluginHost, get_host

# Tried in this order when no --provider is given; offline (no key) is the fallback.
KEYED_DEFAULT_ORDER = ("anthropic", "openai", "openrouter", "gemini")


def _collect(host: PluginHost, hook: str, kind: type) -> dict[str, object]:
    # registration order of plugins: built-ins, then entry points, then extras; the later wins
    order = {name: i for i, name in enumerate(host.records)}
    entries = sorted(host.registries[hook], key=lambda e: order.get(e[0], len(order)))
    out: dict[str, object] = {}
    for plugin_name, obj in entries:
        if not isinstance(obj, kind):
            raise PluginError(
                f"plugin {plugin_name!r} registered a {type(obj).__name__} through {hook}; expected {kind.__name__}",
                hint=f"register spd_host.autointerp.{kind.__name__} objects",
            )
        out[obj.name] = obj  # type: ignore[attr-defined]
    return out


def providers(host: PluginHost | None = None) -> dict[str, Provider]:
    found = _collect(host or get_host(), "register_llm_providers", Provider)
    return {k: v for k, v in sorted(found.items())}  # type: ignore[misc]


def strategies(host: PluginHost | None = None) -> dict[str, Strategy]:
    found = _collect(host or get_host(), "register_autointerp_strategies", Strategy)
    return {k: v for k, v in sorted(found.items())}  # type: ignore[misc]


def get_provider(name: str | None, host: PluginHost | None = None) -> Provider:
    """A provider by name; with ``None``, the first keyed provider whose key is set, else the
    offline baseline."""
    known = providers(host)
    if name is None:
        for candidate in KEYED_DEFAULT_ORDER:
            p = known.get(candidate)
            if p is not None and p.api_key_env and os.environ.get(p.api_key_env):
                return p
        name = "offline"
    if name not in known:
        raise ConfigError(
            f"unknown LLM provider {name!r}",
            hint=f"installed providers: {', '.join(known) or '(none)'}",
        )
    return known[name]


def get_strategy(name: str, host: PluginHost | None = None) -> Strategy:
    known = strategies(host)
    if name not in known:
        raise ConfigError(
            f"unknown autointerp strategy {name!r}",
            hint=f"installed strategies: {', '.join(known) or '(none)'}",
        )
    return known[name]


# the package exports these names (``providers``/``strategies`` are also subpackage names)
list_providers = providers
list_strategies = strategies
