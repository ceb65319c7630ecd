"""Eval suites: what a suite is, and how the host finds the installed ones.

A suite is registered through the ``register_eval_suites`` hook exactly like a third-party
package would register one; the host's own suites come from the built-in plugin
:mod:`spd_host.evals.plugin`. Nothing here knows any decomposition method by name: a suite
receives a ``DecompositionAdapter`` and a validated config, and returns a result model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from spd_host.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from spd_host.adapter import DecompositionAdapter
    from spd_host.evals.results import EvalResult
    from spd_host.plugins import PluginHost

SuiteRun = Callable[["DecompositionAdapter", Any], "EvalResult"]


@dataclass(frozen=True)
class EvalSuite:
    """One named eval suite.

    - ``config_model``: a frozen pydantic model; ``run`` receives an instance of it.
    - ``run(adapter, config)``: computes the result (a subclass of
      :class:`spd_host.evals.results.EvalResult`); the host saves and prints it.
    - ``needs_llm``: the suite calls an LLM judge (``spd-host eval all`` says so).
    - ``needs_harvest``: the suite reads a harvest (``HarvestRepo``) and fails clearly without one.
    """

    name: str
    description: str
    config_model: type[BaseModel]
    run: SuiteRun
    needs_llm: bool = False
    needs_harvest: bool = False

    def make_config(self, **values: Any) -> BaseModel:
        """Validate ``values`` into this suite's config; ``None`` values mean "the default"."""
        given = {k: v for k, v in values.items() if v is not None}
        try:
            return self.config_model(**given)
        except ValidationError as err:
            raise ConfigError(
                f"invalid config for eval suite {self.name!r}: {err}",
                hint=f"fields of {self.config_model.__name__}: {', '.join(self.config_model.model_fields)}",
            ) from None


def eval_suites(host: PluginHost | None = None) -> dict[str, EvalSuite]:
    """Installed suites by name; a later-registered plugin replaces an earlier one's suite."""
    from spd_host.plugins import get_host

    host = host or get_host()
    order = {name: i for i, name in enumerate(host.records)}
    entries = sorted(
        host.registries["register_eval_suites"], key=lambda e: order.get(e[0], len(order))
    )
    out: dict[str, EvalSuite] = {}
    for plugin_name, obj in entries:
        if not isinstance(obj, EvalSuite):
            raise PluginError(
                f"plugin {plugin_name!r} registered a {type(obj).__name__} through register_eval_suites; expected EvalSuite",
                hint="register spd_host.evals.EvalSuite objects",
            )
        out[obj.name] = obj
    return dict(sorted(out.items()))


def get_suite(name: str, host: PluginHost | None = None) -> EvalSuite:
    """The installed suite called ``name``; ``ConfigError`` listing the known ones otherwise."""
    known = eval_suites(host)
    if name not in known:
        raise ConfigError(
            f"unknown eval suite {name!r}",
            hint=f"installed suites: {', '.join(known) or '(none)'}; see `spd-host eval list`",
        )
    return known[name]
