"""What autointerp knows about one component: the boundary between harvest and prompts.

``ComponentEvidence`` is deliberately a plain, fully decoded record (token *strings*, not ids) so
that strategies, providers and tests never need a tokenizer or a harvest on disk: the harvest
bridge (:mod:`spd_host.autointerp.bridge`) builds it from a ``HarvestRepo``, tests build it by
hand. Nothing in it is method-specific except the method's own description, which comes from
the adapter's ``MethodInfo`` and is quoted verbatim in prompts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TokenValue(_Frozen):
    """One decoded token with a statistic (PMI in nats, precision/recall as fractions)."""

    token: str
    value: float


class TokenStatLists(_Frozen):
    """Top tokens by each statistic, best first, for one side (input = current token, output =
    the model's next-token prediction)."""

    pmi: tuple[TokenValue, ...] = ()
    precision: tuple[TokenValue, ...] = ()
    recall: tuple[TokenValue, ...] = ()


class ActivationExample(_Frozen):
    """A window of decoded tokens around one firing, with per-token activation and firing flag.

    ``centre`` is the index (into ``tokens``) of the position the example was sampled at.
    """

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    firings: tuple[bool, ...]
    centre: int = Field(ge=0)

    @model_validator(mode="after")
    def _lengths(self) -> ActivationExample:
        n = len(self.tokens)
        if len(self.activations) != n or len(self.firings) != n:
            raise ValueError(
                f"tokens, activations and firings must have equal lengths, got "
                f"{n}, {len(self.activations)}, {len(self.firings)}"
            )
        if n and self.centre >= n:
            raise ValueError(f"centre {self.centre} is outside the window of {n} tokens")
        return self

    @property
    def max_activation(self) -> float:
        """The example's strength, used to rank and stratify examples."""
        return max(self.activations, default=0.0)

    @property
    def fires(self) -> bool:
        return any(self.firings)


class ComponentEvidence(_Frozen):
    """Everything a prompt strategy may show an LLM about one component."""

    component_key: str = Field(description="'<site>:<index>'")
    site: str
    location: str = Field(description="canonical hook point / module address the site reads from")
    location_description: str = Field(
        default="", description="human description of the location, e.g. 'MLP in block 3 of 12'"
    )
    method_name: str
    method_description: str = Field(description="the adapter's MethodInfo.description, verbatim")
    firing_density: float = Field(ge=0.0, le=1.0, description="fraction of tokens where it fires")
    firing_count: int | None = Field(default=None, ge=0)
    input_tokens: TokenStatLists = TokenStatLists()
    output_tokens: TokenStatLists = TokenStatLists()
    examples: tuple[ActivationExample, ...] = ()
    dataset: str = Field(default="", description="any dataset name; shown as given")
    model_name: str | None = None
