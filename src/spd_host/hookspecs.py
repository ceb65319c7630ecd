"""The contract between spd-host and its plugins.

Everything a decomposition method, an architecture, an eval suite, an autointerp strategy or an
LLM provider needs to plug in is a hook here. Plugins are modules (or objects) with functions
decorated ``@hookimpl`` and exposed through the ``spd_host`` entry-point group::

    [project.entry-points.spd_host]
    my_method = "my_package.plugin"

Two kinds of hook:

- ``register_*(register)``: called once per plugin at start-up; the plugin calls
  ``register(obj)`` for each thing it provides. Cheap: no weights, no network.
- ``load_decomposition`` / ``harvest_fn``: called only on the plugin that registered the
  method (the host dispatches by method name), so one broken plugin cannot answer for another.

This module is the project's constitution: additions are fine, changes to an existing hook's
meaning are breaking changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
    from spd_host.ids import DecompositionId

PROJECT = "spd_host"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    """Declare the decomposition methods this plugin implements.

    Call ``register(MethodInfo(name=..., description=..., short_id_pattern=...))`` once per
    method. The name is the ``<method>`` of decomposition IDs; two plugins registering the same
    name is a load error reported for the second one.
    """


@hookspec(firstresult=True)
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    """Return a ``DecompositionAdapter`` for an ID of one of this plugin's methods.

    Called only on the plugin that registered ``decomposition_id.method``. Resolve the source
    (``spd_host.ids.fetch_source`` for local/hf/wandb; the plugin's own demo and short IDs),
    read metadata, and defer weights until ``load_base_model`` is called. Raise
    ``spd_host.errors.SourceNotFoundError`` / ``FormatError`` naming the file and tensor at fault.
    """


@hookspec(firstresult=True)
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    """Return a callable ``tokens [B, S] -> HarvestBatch`` for an adapter this plugin made.

    The callable runs the base model once per batch, computes every activation type of every
    site, and sets ``firings = primary activation > options.threshold`` (or the method's own
    notion of firing, documented in its ``MethodInfo.description``). The host validates each
    returned batch and names the plugin in any error.

    Run on ``options.device`` and leave the tensors there: the host accumulates on that device.

    A returned batch belongs to the host: it may still be reading it (accumulating on a worker
    thread) while it calls the HarvestFn for the next batch. So return new tensors on every call
    and never write into a batch's tensors after returning it (no output buffers reused between
    calls; copy first if the model writes into preallocated ones). On CUDA, finish the batch on
    the stream that is current when the callable returns (the default one, unless the plugin
    made another current): the host accumulates on that stream, after that work.

    Two optional, cheaper forms (see ``spd_host.adapter.HarvestBatch``), each only when the host
    asks for it, so older hosts and plugins keep working with the dense form:

    - ``options.sparse``: a site may come as ``HarvestBatch.sparse[site]`` (a
      ``SparseActivity``: flat position, component and one value per activation type for each
      firing) instead of ``[B, S, C]`` tensors, when its activations are zero wherever it does
      not fire (TopK / BatchTopK / JumpReLU outputs, a gated CI); ``sparse_activity_of`` makes
      it from dense tensors and says when the contract does not hold.
    - ``options.next_token_top_k = k``: next-token information may come as
      ``HarvestBatch.next_token_topk`` (the top ``>= k`` logits, their ids and the full
      logsumexp; ``next_token_topk_of(logits, k)``) instead of ``[B, S, V]`` logits; with
      ``options.defer_next_token`` also as a ``DeferredNextTokenTopK`` (work the host runs
      when it accumulates the batch, on its accumulation thread: the LM head's top-k off the
      thread that runs the next forward).
    """


@hookspec
def register_architectures(register: Callable[[Any], None]) -> None:
    """Teach the host a model architecture: ``register(spd_host.topology.ArchitectureSpec)``.

    The host ships specs for GPT-2, GPT-NeoX, Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3 and
    OLMo2; a plugin spec whose ``matches`` claims a model takes precedence over the built-ins.
    """


@hookspec
def register_eval_suites(register: Callable[[Any], None]) -> None:
    """Add eval suites: ``register(spd_host.evals.EvalSuite)`` (name, config model, run)."""


@hookspec
def register_autointerp_strategies(register: Callable[[Any], None]) -> None:
    """Add prompt strategies: ``register(spd_host.autointerp.Strategy)``."""


@hookspec
def register_llm_providers(register: Callable[[Any], None]) -> None:
    """Add LLM providers: ``register(spd_host.autointerp.Provider)`` (name, client factory, pricing)."""
