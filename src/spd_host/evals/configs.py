"""Config models of the built-in suites (pydantic only: importing them stays cheap)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FidelityConfig(_Frozen):
    """Options of the fidelity suite (CLI flags map onto these)."""

    dataset: str | None = Field(
        default=None, description="Token source; default: the decomposition's dataset, else demo."
    )
    text_column: str | None = None
    seq_len: int | None = Field(default=None, gt=1, description="Default: the decomposition's.")
    n_tokens: int = Field(default=32_768, gt=0, description="Held-out tokens to evaluate on.")
    batch_size: int = Field(default=16, gt=0)
    seed: int = 0
    per_site: bool = Field(default=True, description="Also splice / ablate each site alone.")
    variants: tuple[str, ...] | None = Field(
        default=None, description="Splice variants to run; default: all the adapter exposes."
    )
    threshold: float = Field(default=0.0, description="Firing threshold passed to the HarvestFn.")
    use_harvest: bool = Field(
        default=True, description="Count alive components from the stored harvest if one exists."
    )
    harvest_run: str | None = Field(default=None, description="Harvest sub-run (default latest).")
