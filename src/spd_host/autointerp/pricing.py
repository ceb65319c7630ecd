"""The price list: every provider's token prices in one data file, ``pricing.yaml``.

Why a data file: prices change more often than code, and every figure needs a date and a
source so a reader can tell whether it is stale. Providers take their tables from here
(:func:`provider_pricing`); the cost cap prices calls with them; ``docs/autointerp.md``
projects the cost of labelling 10^5 and 10^6 components from them
(:mod:`spd_host.autointerp.pricing_report`).

A model that is not listed has no price: the run is refused (the cap could not be enforced)
until a price is given by hand, ``--price-per-mtok IN,OUT``.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_host.autointerp.providers.base import Pricing
from spd_host.errors import ConfigError

PRICING_FILE = "pricing.yaml"


class PriceEntry(BaseModel):
    """One model's prices (USD per million tokens), with when and where they were read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    batch_discount: float = Field(default=0.0, ge=0, lt=1)
    min_cache_tokens: int = Field(default=0, ge=0)
    min_cache_scope: Literal["prefix", "prompt"] = "prefix"
    """What ``min_cache_tokens`` is compared with: the cached prefix itself (Anthropic), or
    the whole prompt (OpenAI and Gemini cache the shared prefix of any prompt that long)."""
    as_of: dt.date
    source: str = Field(min_length=1)

    def caches(self, prefix_tokens: int, prompt_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens`` with a shared prefix of ``prefix_tokens`` is
        long enough to be cached."""
        n = prefix_tokens if self.min_cache_scope == "prefix" else prompt_tokens
        return prefix_tokens > 0 and n >= self.min_cache_tokens

    def pricing(self, *, batch: bool = False) -> Pricing:
        """The per-token prices of a call, synchronous or through the batch API."""
        f = 1.0 - self.batch_discount if batch else 1.0
        return Pricing(
            input_per_mtok=self.input * f,
            output_per_mtok=self.output * f,
            cached_input_per_mtok=None if self.cached_input is None else self.cached_input * f,
            cache_write_per_mtok=None if self.cache_write is None else self.cache_write * f,
        )


PriceTable = dict[str, dict[str, PriceEntry]]


def parse_price_table(doc: Any, where: str) -> PriceTable:
    """Validate a loaded ``pricing.yaml`` document: ``{provider: {model: entry}}``."""
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{where}: expected a mapping of provider -> model -> prices, got {type(doc).__name__}"
        )
    out: PriceTable = {}
    for provider, models in doc.items():
        if not isinstance(models, dict):
            raise ConfigError(f"{where}: provider {provider!r} must map model names to prices")
        out[str(provider)] = {}
        for model, raw in models.items():
            try:
                out[str(provider)][str(model)] = PriceEntry.model_validate(raw)
            except ValidationError as err:
                first = err.errors()[0]
                field = ".".join(str(x) for x in first["loc"]) or "(entry)"
                raise ConfigError(
                    f"{where}: {provider}/{model}: {field}: {first['msg']}",
                    hint="every entry needs input, output, as_of and source (see the file's header)",
                ) from None
    return out


@cache
def price_table() -> PriceTable:
    """The packaged price list (read once)."""
    text = resources.files("spd_host.autointerp").joinpath(PRICING_FILE).read_text("utf-8")
    return parse_price_table(yaml.safe_load(text), PRICING_FILE)


def provider_pricing(provider: str) -> dict[str, Pricing]:
    """A provider's models and their synchronous prices, for :class:`Provider.pricing`."""
    return {m: e.pricing() for m, e in price_table().get(provider, {}).items()}


def price_entry(provider: str, model: str) -> PriceEntry | None:
    return price_table().get(provider, {}).get(model)


def parse_price_pair(text: str) -> tuple[float, float]:
    """``"IN,OUT"`` (USD per million input, output tokens) from ``--price-per-mtok``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        values = (float(parts[0]), float(parts[1]))
    except ValueError:
        raise ConfigError(
            f"--price-per-mtok {text!r}: expected two numbers IN,OUT",
            hint="USD per million input and output tokens, e.g. --price-per-mtok 0.3,2.5",
        ) from None
    if any(v < 0 or v != v or v == float("inf") for v in values):
        raise ConfigError(f"--price-per-mtok {text!r}: prices must be finite and >= 0")
    return values
