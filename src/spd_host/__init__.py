"""spd-host: the host of the downstream pipeline for LM decompositions.

The public API is listed in ``__all__``. Importing this package is cheap: heavy modules
(torch, transformers, plugins) load on first use of the name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DecompositionAdapter": "spd_host.adapter",
    "DecompositionDefaults": "spd_host.adapter",
    "HarvestBatch": "spd_host.adapter",
    "HarvestFn": "spd_host.adapter",
    "HarvestOptions": "spd_host.adapter",
    "MethodInfo": "spd_host.adapter",
    "Site": "spd_host.adapter",
    "SupportsSplice": "spd_host.adapter",
    "component_key": "spd_host.adapter",
    "DecompositionId": "spd_host.ids",
    "parse_decomposition_id": "spd_host.ids",
    "fetch_source": "spd_host.ids",
    "hookimpl": "spd_host.hookspecs",
    "load_adapter": "spd_host.plugins",
    "get_host": "spd_host.plugins",
    "temporary_plugins": "spd_host.plugins",
    "SpdHostError": "spd_host.errors",
    "EvalSuite": "spd_host.evals",
    "EvalResult": "spd_host.evals",
    "run_suite": "spd_host.evals",
    "AutointerpConfig": "spd_host.autointerp",
    "ComponentEvidence": "spd_host.autointerp",
    "run_autointerp": "spd_host.autointerp",
    "load_labels": "spd_host.autointerp",
    "topology_of": "spd_host.topology",
    "TransformerTopology": "spd_host.topology",
    "ArchitectureSpec": "spd_host.topology",
    "load_base_model": "spd_host.models",
    "load_tokenizer": "spd_host.models",
    "TokenDatasetSpec": "spd_host.data",
    "iter_token_batches": "spd_host.data",
    "DEMO_MODEL_NAME": "spd_host.demo",
    "demo_model_dir": "spd_host.demo",
    "HarvestConfig": "spd_host.harvest",
    "HarvestRepo": "spd_host.harvest",
    "run_harvest": "spd_host.harvest",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spd_host' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
