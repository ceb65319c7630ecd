"""spd-host: the host of the downstream pipeline for LM decompositions.

The public API is ``__all__``; everything else (submodules included) is internal and may change.
It covers, in pipeline order:

- load a decomposition: ``load_adapter(id)`` -> ``DecompositionAdapter``; IDs are
  ``method:source`` (``parse_decomposition_id``, ``DecompositionId``); ``get_host()`` is the
  plugin host (methods, providers, suites installed).
- the base model and its structure: ``load_base_model``, ``load_tokenizer``, ``topology_of`` ->
  ``TransformerTopology`` (canonical addresses, capture and replace hooks), ``ArchitectureSpec``;
  token data: ``TokenDatasetSpec``, ``iter_token_batches``; the bundled demo model:
  ``DEMO_MODEL_NAME``, ``demo_model_dir``.
- harvest: ``HarvestConfig``, ``run_harvest``; open results with ``HarvestRepo.open(id)``
  (``ComponentSummary``, ``ComponentDetail``, ``TokenStats``).
- autointerp: ``AutointerpConfig``, ``run_autointerp``, ``load_labels``, ``ComponentEvidence``.
- evals: ``run_suite(name, id, **options)`` -> ``EvalResult`` (saved as JSON), ``eval_suites``,
  ``get_suite``, ``EvalSuite``.
- writing a plugin: ``hookimpl``, ``DecompositionAdapter``, ``SupportsSplice``, ``Site``,
  ``MethodInfo``, ``DecompositionDefaults``, ``HarvestFn``, ``HarvestBatch``, ``HarvestOptions``,
  ``component_key``, ``fetch_source``, ``temporary_plugins``.
- errors: every error spd-host raises on bad input is a ``SpdHostError`` (message + ``hint``).

Importing this package is cheap: each name's module loads on first use, and the names that
need no model (IDs, plugin host, configs, result models) do not import torch or transformers.
See ``examples/quickstart.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spd_host._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names as _LAZY, for type checkers and IDEs
    from spd_host.adapter import (
        DecompositionAdapter,
        DecompositionDefaults,
        HarvestBatch,
        HarvestFn,
        HarvestOptions,
        MethodInfo,
        Site,
        SupportsSplice,
        component_key,
    )
    from spd_host.autointerp import (
        AutointerpConfig,
        ComponentEvidence,
        load_labels,
        run_autointerp,
    )
    from spd_host.data import TokenDatasetSpec, iter_token_batches
    from spd_host.demo import DEMO_MODEL_NAME, demo_model_dir
    from spd_host.errors import SpdHostError
    from spd_host.evals import EvalResult, EvalSuite, eval_suites, get_suite, run_suite
    from spd_host.harvest import (
        ComponentDetail,
        ComponentSummary,
        HarvestConfig,
        HarvestRepo,
        TokenStats,
        run_harvest,
    )
    from spd_host.hookspecs import hookimpl
    from spd_host.ids import DecompositionId, fetch_source, parse_decomposition_id
    from spd_host.models import load_base_model, load_tokenizer
    from spd_host.plugins import get_host, load_adapter, temporary_plugins
    from spd_host.topology import ArchitectureSpec, TransformerTopology, topology_of

# public name -> module that defines it
_LAZY = {
    # load a decomposition
    "load_adapter": "spd_host.plugins",
    "get_host": "spd_host.plugins",
    "DecompositionId": "spd_host.ids",
    "parse_decomposition_id": "spd_host.ids",
    # base model, topology, data
    "load_base_model": "spd_host.models",
    "load_tokenizer": "spd_host.models",
    "topology_of": "spd_host.topology",
    "TransformerTopology": "spd_host.topology",
    "ArchitectureSpec": "spd_host.topology",
    "TokenDatasetSpec": "spd_host.data",
    "iter_token_batches": "spd_host.data",
    "DEMO_MODEL_NAME": "spd_host.demo",
    "demo_model_dir": "spd_host.demo",
    # harvest and its results
    "HarvestConfig": "spd_host.harvest",
    "run_harvest": "spd_host.harvest",
    "HarvestRepo": "spd_host.harvest",
    "ComponentSummary": "spd_host.harvest",
    "ComponentDetail": "spd_host.harvest",
    "TokenStats": "spd_host.harvest",
    # autointerp
    "AutointerpConfig": "spd_host.autointerp",
    "run_autointerp": "spd_host.autointerp",
    "load_labels": "spd_host.autointerp",
    "ComponentEvidence": "spd_host.autointerp",
    # evals
    "run_suite": "spd_host.evals",
    "eval_suites": "spd_host.evals",
    "get_suite": "spd_host.evals",
    "EvalSuite": "spd_host.evals",
    "EvalResult": "spd_host.evals",
    # writing a plugin
    "hookimpl": "spd_host.hookspecs",
    "DecompositionAdapter": "spd_host.adapter",
    "SupportsSplice": "spd_host.adapter",
    "DecompositionDefaults": "spd_host.adapter",
    "HarvestBatch": "spd_host.adapter",
    "HarvestFn": "spd_host.adapter",
    "HarvestOptions": "spd_host.adapter",
    "MethodInfo": "spd_host.adapter",
    "Site": "spd_host.adapter",
    "component_key": "spd_host.adapter",
    "fetch_source": "spd_host.ids",
    "temporary_plugins": "spd_host.plugins",
    # errors
    "SpdHostError": "spd_host.errors",
}

# literal, so that linters and type checkers see the public names
__all__ = [
    "DEMO_MODEL_NAME",
    "ArchitectureSpec",
    "AutointerpConfig",
    "ComponentDetail",
    "ComponentEvidence",
    "ComponentSummary",
    "DecompositionAdapter",
    "DecompositionDefaults",
    "DecompositionId",
    "EvalResult",
    "EvalSuite",
    "HarvestBatch",
    "HarvestConfig",
    "HarvestFn",
    "HarvestOptions",
    "HarvestRepo",
    "MethodInfo",
    "Site",
    "SpdHostError",
    "SupportsSplice",
    "TokenDatasetSpec",
    "TokenStats",
    "TransformerTopology",
    "__version__",
    "component_key",
    "demo_model_dir",
    "eval_suites",
    "fetch_source",
    "get_host",
    "get_suite",
    "hookimpl",
    "iter_token_batches",
    "load_adapter",
    "load_base_model",
    "load_labels",
    "load_tokenizer",
    "parse_decomposition_id",
    "run_autointerp",
    "run_harvest",
    "run_suite",
    "temporary_plugins",
    "topology_of",
]


__getattr__, __dir__ = lazy_exports("spd_host", _LAZY, __all__, globals())
