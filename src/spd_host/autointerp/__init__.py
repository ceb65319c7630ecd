"""Autointerp: label every component of a harvest with an LLM, resumably, within budget.

Public API::

    AutointerpConfig, run_autointerp, label_components, alabel_components, RunReport,
    load_labels, labels_db_path, LabelStore, LabelRecord,
    ComponentEvidence, ActivationExample, TokenStatLists, TokenValue,
    evidence_from_harvest, HarvestEvidence, ExampleSelection, select_examples,
    Provider, Pricing, ClientOptions, CompletionRequest, Completion, LLMClient,
    RateLimitedError, TransientError, PermanentError, MalformedAnswerError,
    Strategy, StrategyOptions, Prompt, LabelAnswer, ANSWER_SCHEMA,
    list_providers, list_strategies, get_provider, get_strategy

Importing this package is cheap: the SDKs load when a client is made, the harvest when a
harvest is opened. See ``docs/autointerp.md``.
"""

from __future__ import annotations

from spd_host._lazy import lazy_exports

_LAZY = {
    "AutointerpConfig": "spd_host.autointerp.config",
    "run_autointerp": "spd_host.autointerp.api",
    "load_labels": "spd_host.autointerp.api",
    "labels_db_path": "spd_host.autointerp.api",
    "label_components": "spd_host.autointerp.runner",
    "alabel_components": "spd_host.autointerp.runner",
    "RunReport": "spd_host.autointerp.runner",
    "LabelStore": "spd_host.autointerp.store",
    "LabelRecord": "spd_host.autointerp.store",
    "ComponentEvidence": "spd_host.autointerp.evidence",
    "ActivationExample": "spd_host.autointerp.evidence",
    "TokenStatLists": "spd_host.autointerp.evidence",
    "TokenValue": "spd_host.autointerp.evidence",
    "evidence_from_harvest": "spd_host.autointerp.bridge",
    "HarvestEvidence": "spd_host.autointerp.bridge",
    "ExampleSelection": "spd_host.autointerp.selection",
    "select_examples": "spd_host.autointerp.selection",
    "Provider": "spd_host.autointerp.providers.base",
    "Pricing": "spd_host.autointerp.providers.base",
    "ClientOptions": "spd_host.autointerp.providers.base",
    "CompletionRequest": "spd_host.autointerp.providers.base",
    "Completion": "spd_host.autointerp.providers.base",
    "LLMClient": "spd_host.autointerp.providers.base",
    "RateLimitedError": "spd_host.autointerp.providers.base",
    "TransientError": "spd_host.autointerp.providers.base",
    "PermanentError": "spd_host.autointerp.providers.base",
    "MalformedAnswerError": "spd_host.autointerp.answer",
    "LabelAnswer": "spd_host.autointerp.answer",
    "ANSWER_SCHEMA": "spd_host.autointerp.answer",
    "Strategy": "spd_host.autointerp.strategies.base",
    "StrategyOptions": "spd_host.autointerp.strategies.base",
    "Prompt": "spd_host.autointerp.strategies.base",
    "list_providers": "spd_host.autointerp.registry",
    "list_strategies": "spd_host.autointerp.registry",
    "get_provider": "spd_host.autointerp.registry",
    "get_strategy": "spd_host.autointerp.registry",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports("spd_host.autointerp", _LAZY, __all__, globals())
