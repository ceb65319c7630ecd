"""The strategy contract: evidence in, a (system, user) prompt out.

Strategies are registered through ``register_autointerp_strategies``. Each has an options model
(frozen pydantic) so the CLI and config files can set its knobs, and its name is part of the
resume key: labels of different strategies never overwrite each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import ExampleSelection
from spd_host.autointerp.strategies.rendering import ExampleRendering


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


class StrategyOptions(BaseModel):
    """Options shared by the built-in strategies (a strategy may subclass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    selection: ExampleSelection = ExampleSelection()
    label_max_words: int = Field(default=6, ge=2)
    n_stat_tokens: int = Field(default=8, ge=0, description="tokens per statistic list")
    forbidden_words: tuple[str, ...] = ("various", "miscellaneous", "general", "mixed")
    max_example_chars: int = Field(default=400, ge=40, description="per-example cap on characters")
    rendering: ExampleRendering = ExampleRendering()


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    build: Callable[[ComponentEvidence, Any], Prompt]
    options_model: type[BaseModel] = StrategyOptions

    def options(self, raw: dict[str, Any] | BaseModel | None = None) -> BaseModel:
        if isinstance(raw, self.options_model):
            return raw
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        return self.options_model.model_validate(raw or {})

    def prompt(self, evidence: ComponentEvidence, options: BaseModel | None = None) -> Prompt:
        return self.build(evidence, options if options is not None else self.options())
