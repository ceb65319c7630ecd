"""Plugin discovery and the registries built from it.

Plugins come from the ``spd_host`` entry-point group (first-party methods included: the host
imports none of them directly). ``SPD_HOST_LOAD_PLUGINS`` restricts third-party loading:
unset loads everything, a comma-separated list loads only those entry-point or distribution
names, and an empty string loads no third-party plugin. Plugins shipped in the ``spd-host``
distribution itself always load.

A plugin that fails to import, or whose ``register_*`` hook raises, is recorded as a load error
(shown by ``spd-host plugins``) and does not take down the others.

Tests register throwaway plugins with :func:`temporary_plugins`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import pluggy

from spd_host import hookspecs
from spd_host.adapter import (
    DecompositionAdapter,
    DeferredNextTokenTopK,
    HarvestBatch,
    HarvestFn,
    HarvestOptions,
    MethodInfo,
    NextTokenTopK,
    invalid_batch_error,
    validate_harvest_batch,
    validate_next_token_topk,
)
from spd_host.errors import DecompositionIdError, PluginError, SpdHostError
from spd_host.ids import DecompositionId, parse_decomposition_id

ENTRY_POINT_GROUP = "spd_host"
LOAD_PLUGINS_ENV = "SPD_HOST_LOAD_PLUGINS"
FIRST_PARTY_DISTRIBUTION = "spd-host"

# Plugin modules that are part of the host itself (not optional, not behind an entry point).
# They register first, so an entry-point plugin registering the same provider/strategy name
# overrides them (``registered`` lists later plugins first).
BUILTIN_PLUGINS = (
    ("spd_host.autointerp", "spd_host.autointerp.plugin"),
    ("spd_host.evals", "spd_host.evals.plugin"),
)

REGISTER_HOOKS = (
    "register_methods",
    "register_architectures",
    "register_eval_suites",
    "register_autointerp_strategies",
    "register_llm_providers",
)


@dataclass
class PluginRecord:
    """What ``spd-host plugins`` reports for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    first_party: bool = False
    methods: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "first_party": self.first_party,
            "methods": self.methods,
            "hooks": self.hooks,
            "errors": self.errors,
            "loaded": not self.errors,
        }


@dataclass(frozen=True)
class RegisteredMethod:
    info: MethodInfo
    plugin_name: str
    plugin: object


class PluginHost:
    """The plugin manager plus the registries its ``register_*`` hooks filled."""

    def __init__(
        self, extra_plugins: Sequence[tuple[str, object]] = (), *, entry_points: bool = True
    ):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.methods: dict[str, RegisteredMethod] = {}
        self.registries: dict[str, list[tuple[str, Any]]] = {h: [] for h in REGISTER_HOOKS}
        self._load_builtins()
        if entry_points:
            self._load_entry_points()
        for name, plugin in extra_plugins:
            self._register(name, plugin, PluginRecord(name=name))
        self._run_register_hooks()

    # -- loading -------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        import importlib

        for name, module in BUILTIN_PLUGINS:
            record = PluginRecord(
                name=name, distribution=FIRST_PARTY_DISTRIBUTION, first_party=True
            )
            try:
                plugin = importlib.import_module(module)
            except BaseException as err:
                _reraise_interrupts(err)
                record.errors.append(f"import of {module!r} failed: {_short(err)}")
                self.records[name] = record
                continue
            self._register(name, plugin, record)

    def _load_entry_points(self) -> None:
        allowed = os.environ.get(LOAD_PLUGINS_ENV)
        allow = None if allowed is None else {a.strip() for a in allowed.split(",") if a.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            first_party = dist is not None and _canonical(dist) == FIRST_PARTY_DISTRIBUTION
            if (
                not first_party
                and allow is not None
                and ep.name not in allow
                and (dist is None or dist not in allow)
            ):
                continue
            if ep.name in self.records:
                continue  # the same package visible twice on sys.path
            record = PluginRecord(
                name=ep.name,
                distribution=dist,
                version=ep.dist.version if ep.dist is not None else None,
                first_party=first_party,
            )
            try:
                plugin = ep.load()
            except BaseException as err:
                _reraise_interrupts(err)
                record.errors.append(f"import of {ep.value!r} failed: {_short(err)}")
                self.records[ep.name] = record
                continue
            self._register(ep.name, plugin, record)

    def _register(self, name: str, plugin: object, record: PluginRecord) -> None:
        self.records[name] = record
        try:
            self.pm.register(plugin, name=name)
        except BaseException as err:  # pluggy validation errors, duplicate registration
            _reraise_interrupts(err)
            record.errors.append(f"registration failed: {_short(err)}")
            return
        record.hooks = sorted({hc.name for hc in self.pm.get_hookcallers(plugin) or []})

    def _run_register_hooks(self) -> None:
        for hook_name in REGISTER_HOOKS:
            caller = getattr(self.pm.hook, hook_name)
            # Registration order, first-party (built-ins and this distribution's entry points)
            # first: a third-party plugin cannot take a first-party method name, and
            # ``registered()`` (which lists later registrations first) lets it override a
            # built-in provider, strategy, suite or architecture on purpose.
            impls = sorted(
                caller.get_hookimpls(),
                key=lambda impl: (
                    not self.records.get(impl.plugin_name, PluginRecord("")).first_party
                ),
            )
            for impl in impls:
                record = self.records.setdefault(impl.plugin_name, PluginRecord(impl.plugin_name))
                register = self._register_callback(hook_name, impl.plugin_name, impl.plugin)
                try:
                    impl.function(register=register)
                except BaseException as err:
                    _reraise_interrupts(err)
                    record.errors.append(f"{hook_name} raised: {_short(err)}")

    def _register_callback(
        self, hook_name: str, plugin_name: str, plugin: object
    ) -> Callable[[Any], None]:
        def register(obj: Any) -> None:
            if hook_name == "register_methods":
                if not isinstance(obj, MethodInfo):
                    raise TypeError(
                        f"register_methods expects MethodInfo, got {type(obj).__name__}"
                    )
                if obj.name in self.methods:
                    owner = self.methods[obj.name].plugin_name
                    raise PluginError(
                        f"method {obj.name!r} is already registered by plugin {owner!r}",
                        hint=f"uninstall one of {owner!r} and {plugin_name!r}",
                    )
                self.methods[obj.name] = RegisteredMethod(obj, plugin_name, plugin)
                self.records[plugin_name].methods.append(obj.name)
            else:
                self.registries[hook_name].append((plugin_name, obj))

        return register

    # -- queries -------------------------------------------------------------------------------
    @property
    def method_names(self) -> list[str]:
        return sorted(self.methods)

    def short_id_patterns(self) -> dict[str, str]:
        return {
            name: m.info.short_id_pattern
            for name, m in sorted(self.methods.items())
            if m.info.short_id_pattern
        }

    def registered(self, hook_name: str) -> list[Any]:
        """Objects registered through ``hook_name`` (later plugins first, so they can override)."""
        return [obj for _, obj in reversed(self.registries[hook_name])]

    def parse_id(self, raw: str) -> DecompositionId:
        return parse_decomposition_id(
            raw, methods=self.method_names, short_id_patterns=self.short_id_patterns()
        )

    def load_adapter(
        self, decomposition_id: str | DecompositionId, *, base_model: str | None = None
    ) -> DecompositionAdapter:
        """Parse an ID and ask the owning plugin for its adapter.

        ``base_model`` (a Hub name or a local directory) replaces the base model the
        decomposition names, e.g. one that is not in the local cache; it applies to every
        later load of that name in this process (``spd_host.models.override_base_model``).
        """
        did = (
            decomposition_id
            if isinstance(decomposition_id, DecompositionId)
            else self.parse_id(decomposition_id)
        )
        owner = self.methods.get(did.method)
        if owner is None:
            raise DecompositionIdError(
                f"no installed plugin provides method {did.method!r}",
                hint=f"installed methods: {', '.join(self.method_names) or '(none)'}",
            )
        adapter = self._call_owner("load_decomposition", owner, decomposition_id=did)
        if adapter is None:
            raise PluginError(
                f"plugin {owner.plugin_name!r} registered method {did.method!r} but returned no adapter for {did.raw!r}",
                hint="the plugin must implement load_decomposition for its methods",
            )
        if not isinstance(adapter, DecompositionAdapter):
            raise PluginError(
                f"plugin {owner.plugin_name!r} returned a {type(adapter).__name__}, which lacks the DecompositionAdapter attributes"
            )
        if base_model is not None:
            from spd_host.models import override_base_model

            try:
                named: str | None = adapter.base_model_name or None
            except SpdHostError:  # the decomposition names no base model: use it for any
                named = None
            override_base_model(base_model, named)
        return adapter

    def harvest_fn(
        self, adapter: DecompositionAdapter, options: HarvestOptions | None = None
    ) -> HarvestFn:
        """The owning plugin's HarvestFn, wrapped so every batch is validated."""
        options = options or HarvestOptions()
        owner = self.methods[adapter.method.name]
        fn = self._call_owner("harvest_fn", owner, adapter=adapter, options=options)
        if fn is None:
            raise PluginError(
                f"plugin {owner.plugin_name!r} provides no harvest_fn for {adapter.decomposition_id!r}"
            )
        sites = list(adapter.sites)
        act_types = list(adapter.activation_types)
        vocab: list[int | None] = [None]  # the first batch's next-token vocabulary

        def validated(tokens: Any) -> HarvestBatch:
            shape = list(getattr(tokens, "shape", []))
            with _contained(
                f"plugin {owner.plugin_name!r} harvest_fn failed on a batch of shape {shape}"
            ):
                batch = fn(tokens)
            n_vocab = validate_harvest_batch(
                batch,
                sites=sites,
                activation_types=act_types,
                plugin=owner.plugin_name,
                expect_next_token=options.next_token,
                min_top_k=options.next_token_top_k,
                input_tokens=tokens,
                vocab_size=vocab[0],
            )
            if vocab[0] is None:
                vocab[0] = n_vocab
            if isinstance(batch.next_token_topk, DeferredNextTokenTopK):
                batch = replace(
                    batch,
                    next_token_topk=_checked_when_resolved(
                        batch.next_token_topk,
                        tuple(batch.tokens.shape),
                        options.next_token_top_k,
                        owner.plugin_name,
                    ),
                )
            return batch

        return validated

    def _call_owner(self, hook_name: str, owner: RegisteredMethod, **kwargs: Any) -> Any:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is owner.plugin:
                with _contained(
                    f"plugin {owner.plugin_name!r} failed in {hook_name}",
                    hint="run with SPD_HOST_DEBUG=1 for the full traceback",
                ):
                    return impl.function(**kwargs)
        return None


def _checked_when_resolved(
    deferred: DeferredNextTokenTopK, shape: tuple[int, ...], min_top_k: int | None, plugin: str
) -> DeferredNextTokenTopK:
    """The plugin's deferred top-k, checked like an immediate one when the host resolves it
    (on its accumulation thread): a plugin failure or a bad result becomes the same
    ``PluginError`` / ``HarvestBatchError`` that ``validated`` would have raised at once."""
    B, S = shape
    fail = invalid_batch_error(plugin)

    def compute() -> NextTokenTopK:
        with _contained(
            f"plugin {plugin!r} harvest_fn failed computing a deferred next-token top-k"
        ):
            tk = deferred.resolve()
        validate_next_token_topk(tk, B, S, min_top_k, fail)
        if int(tk.vocab_size) != deferred.vocab_size:
            raise fail(
                f"the deferred next-token top-k is over {tk.vocab_size} tokens, it announced "
                f"{deferred.vocab_size}"
            )
        return tk

    return DeferredNextTokenTopK(compute, deferred.vocab_size)


@contextmanager
def _contained(message: str, *, hint: str | None = None) -> Iterator[None]:
    """Run plugin code: any failure but the host's own errors and a user's interrupt becomes
    one ``PluginError`` (``message: <the failure in short>``), chained to the original."""
    try:
        yield
    except SpdHostError:
        raise
    except BaseException as err:
        _reraise_interrupts(err)
        raise PluginError(f"{message}: {_short(err)}", hint=hint) from err


def _reraise_interrupts(err: BaseException) -> None:
    """Plugin code is contained: any failure, ``SystemExit`` included (a plugin calling
    ``sys.exit`` at import used to take down every command with no output), becomes a
    recorded plugin error. Only a user's Ctrl-C and asyncio cancellation go through."""
    import asyncio

    if isinstance(err, (KeyboardInterrupt, asyncio.CancelledError)):
        raise err


def _canonical(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if os.environ.get("SPD_HOST_DEBUG"):
        text += "\n" + "".join(traceback.format_exception(err))
    return text


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host (built on first use)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def reset_host() -> None:
    """Forget the plugin host so the next ``get_host`` re-reads entry points and env vars."""
    global _HOST
    _HOST = None


@contextmanager
def temporary_plugins(
    *plugins: tuple[str, object], entry_points: bool = True
) -> Iterator[PluginHost]:
    """Use a host with extra ``(name, plugin)`` pairs registered, for tests and notebooks."""
    global _HOST
    previous = _HOST
    _HOST = PluginHost(plugins, entry_points=entry_points)
    try:
        yield _HOST
    finally:
        _HOST = previous


def load_adapter(
    decomposition_id: str | DecompositionId, *, base_model: str | None = None
) -> DecompositionAdapter:
    """Load a decomposition by ID through the installed plugins (``base_model``: see
    :meth:`PluginHost.load_adapter`)."""
    return get_host().load_adapter(decomposition_id, base_model=base_model)
