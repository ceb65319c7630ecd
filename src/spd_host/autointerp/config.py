"""The options of one autointerp run (everything the CLI flags set)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_COST_CAP_USD = 5.0
"""The cap the CLI (autointerp and the LLM eval suites) applies unless told otherwise."""


class AutointerpConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str | None = Field(
        default=None, description="provider name; None: first provider with a key set, else offline"
    )
    model: str | None = Field(default=None, description="None: the provider's default model")
    strategy: str = "compact_skeptical"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    max_concurrent: int = Field(default=8, ge=1)
    rpm: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="request starts per minute"
    )
    cost_cap_usd: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="hard cap on the label store's total spend, across resumes",
    )
    max_attempts: int = Field(default=5, ge=1, description="attempts per component")
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_retry_after_s: float = Field(
        default=300.0,
        ge=0,
        allow_inf_nan=False,
        description="longest Retry-After honoured; a longer one fails that request instead",
    )
    max_output_tokens: int = Field(default=600, ge=16)
    base_url: str | None = None
    api_key_env: str | None = Field(
        default=None, description="read the key from this variable instead of the provider's"
    )
    input_price_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output_price_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    limit: int | None = Field(default=None, ge=0, description="label at most this many components")
    min_firing_count: int = Field(
        default=1, ge=0, description="skip components that fired fewer times in the harvest"
    )
    batch: bool = Field(
        default=False,
        description="send through the provider's batch API (half price, results within 24 h)",
    )
    poll_interval_s: float = Field(
        default=30.0, gt=0, allow_inf_nan=False, description="seconds between batch status polls"
    )
    cancel_batches: bool = Field(
        default=False,
        description="send nothing: cancel the open batches of this run's scope and collect "
        "what they return (finished requests billed and stored, the rest failure rows)",
    )
    batch_max_requests: int | None = Field(
        default=None,
        ge=1,
        description="requests per batch (default and ceiling: the provider's own limit)",
    )
