"""Which activation examples a prompt shows: the top ones plus quantile-stratified ones.

Following delphi's practice, the strongest examples alone over-represent a component's peak
behaviour, so after the ``n_top`` strongest firing examples the remaining firing examples are
ranked by maximum activation, cut into ``n_quantiles`` equal-count strata, and ``per_quantile``
examples are drawn from each stratum with a seeded RNG (deterministic for a component key and
seed, so a re-run builds the same prompt). Examples without any firing token are dropped: they
cannot show what the component responds to.
"""

from __future__ import annotations

import hashlib
import random

from pydantic import BaseModel, ConfigDict, Field

from spd_host.autointerp.evidence import ActivationExample


class ExampleSelection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n_top: int = Field(default=10, ge=0, description="strongest examples, strongest first")
    n_quantiles: int = Field(default=4, ge=0, description="strata over the remaining examples")
    per_quantile: int = Field(default=2, ge=0, description="examples drawn from each stratum")
    seed: int = 0


def select_examples(
    examples: tuple[ActivationExample, ...] | list[ActivationExample],
    selection: ExampleSelection,
    *,
    key: str = "",
) -> list[ActivationExample]:
    """Top ``n_top`` by max activation, then ``per_quantile`` from each of ``n_quantiles`` strata
    (strongest stratum first; within a stratum, strongest first)."""
    firing = [e for e in examples if e.fires]
    ranked = sorted(range(len(firing)), key=lambda i: (-firing[i].max_activation, i))
    top = ranked[: selection.n_top]
    rest = ranked[selection.n_top :]
    chosen = list(top)
    if selection.n_quantiles and selection.per_quantile and rest:
        digest = hashlib.sha256(f"{selection.seed}:{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        n_q = min(selection.n_quantiles, len(rest))
        for q in range(n_q):
            lo = q * len(rest) // n_q
            hi = (q + 1) * len(rest) // n_q
            stratum = rest[lo:hi]
            take = min(selection.per_quantile, len(stratum))
            picked = rng.sample(stratum, take)
            chosen.extend(sorted(picked, key=ranked.index))
    return [firing[i] for i in chosen]
