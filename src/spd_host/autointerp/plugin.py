"""The host's built-in autointerp plugin: the providers and strategies spd-host ships.

Registered by :class:`spd_host.plugins.PluginHost` before any entry point (see
``BUILTIN_PLUGINS`` there), through exactly the hooks a third-party package would use, so a
plugin can add providers and strategies, or replace one of these by registering the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spd_host.hookspecs import hookimpl


@hookimpl
def register_llm_providers(register: Callable[[Any], None]) -> None:
    from spd_host.autointerp.providers import (
        anthropic_provider,
        gemini_provider,
        local_provider,
        offline,
        openai_provider,
    )

    register(offline.PROVIDER)
    register(anthropic_provider.PROVIDER)
    register(openai_provider.OPENAI)
    register(openai_provider.OPENROUTER)
    register(openai_provider.OPENAI_COMPATIBLE)
    register(gemini_provider.PROVIDER)
    register(local_provider.PROVIDER)


@hookimpl
def register_autointerp_strategies(register: Callable[[Any], None]) -> None:
    from spd_host.autointerp.strategies import canon, compact_skeptical, dual_view, rich_examples

    register(compact_skeptical.STRATEGY)
    register(dual_view.STRATEGY)
    register(rich_examples.STRATEGY)
    register(canon.STRATEGY)
