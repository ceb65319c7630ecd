"""Which examples a judge is shown: positives by activation quantile, negatives that never fire.

Positives (``positives``):

- ``quantiles`` (default, delphi's ``test_type="quantiles"``): the harvest's reservoir is a
  uniform sample of *all* the component's firings, so ranking it by the firing's activation
  (``ActivationExample.score``, the primary activation at the firing token) and cutting the
  ranking into ``n_quantiles`` equal bins (10, delphi's ``n_quantiles`` default) gives bins
  that each hold about the same share of the population. The top-K examples are only ever
  candidates of the top bin (they *are* the population's top). A trial of ``n`` positives
  draws one stratified population quantile per positive, ``q_k = (k + u_k) / n``, takes bin
  ``floor(q_k * n_bins)`` and a uniform example in it: every bin is equally likely overall and
  a trial's picks spread over the whole range. Bin assignment by rank ``r`` (0 = lowest) of
  ``K`` reservoir examples is ``floor(r * n_bins / K)``: bins differ in size by at most one
  and nothing is dropped (delphi ranks descending, gives each of its ``n_quantiles`` slices
  ``len // n_quantiles`` examples, numbers its top slice 0, and drops the lowest
  ``len % n_quantiles``).
- ``top_and_reservoir`` (before issue #15): equal bins over the union of top-K and reservoir,
  half of which is the top-K, so the picks lean to the population's top.

Negatives (``negatives``):

- ``random`` (default, delphi's ``non_activating_source="random"``): a window from the
  reservoir of another component picked with probability proportional to its firing count,
  i.e. a firing event drawn uniformly over the harvest, kept only if the target fires nowhere
  in it when the window is run through the decomposition;
- ``similar_density``: a window of a component whose density is within ``density_tolerance``
  of the target's (top-K or reservoir), same check; when none qualifies, a ``random`` one
  (recorded as such).

Window alone (``window``): a harvest window holds only ``context_tokens`` tokens each side, and
the firing it was cut around may depend on earlier context. Every shown positive is run alone
through the decomposition and records whether the firing reproduces. ``as_recorded`` shows the
drawn windows as they are; ``prefer_alone`` prefers, within the drawn bin, examples whose
firing reproduces; ``widen`` adds left context from the harvest's token stream (doubling, at
most ``max_widen_tokens`` tokens) until it does. A judge that sees only the window cannot call
a positive whose firing it does not show: ``ceiling`` is the balanced accuracy a perfect
judge reaches when it answers from the windows as shown.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from spd_host.errors import ConfigError

if TYPE_CHECKING:
    from spd_host.evals.llm.trials import Pool, Shown

PositivesMode = Literal["quantiles", "top_and_reservoir"]
NegativesMode = Literal["random", "similar_density"]
WindowMode = Literal["as_recorded", "prefer_alone", "widen"]
Visible = Literal["any", "centre"]
SequenceFn = Callable[[int], tuple[list[int], int]]
"""position -> (the whole harvest sequence holding it, the position's offset in it)"""

DEFAULT_N_QUANTILES = 10  # delphi's SamplerConfig.n_quantiles
_TRIES = 40
LOOKAHEAD = 4
"""Candidates checked in one batch where the draw stops at the first that passes."""


class PopulationOptions(BaseModel):
    """How trial builders draw examples (copied from ``JudgeSuiteConfig``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    positives: PositivesMode = "quantiles"
    n_quantiles: int = Field(default=DEFAULT_N_QUANTILES, ge=1)
    negatives: NegativesMode = "random"
    density_tolerance: float = Field(default=0.5, gt=0)
    window: WindowMode = "as_recorded"
    max_widen_tokens: int = Field(default=64, ge=1)


class ExampleOrigin(BaseModel):
    """Where one shown example came from and what its window alone does (one per trial item)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item: int = 0  # 1-based index among the trial's items as shown (set once shuffled)
    role: Literal["positive", "negative"]
    source: Literal["top", "reservoir", "random", "similar_density"]
    component: str  # whose harvest example the window is
    position: int  # the example's firing token in the harvest's token stream
    activation: float | None = None  # positives: the target's activation at that firing
    bin: int | None = None  # positives (quantiles): 0 = lowest of n_bins
    n_bins: int | None = None
    population_quantile: float | None = None  # positives: estimated from the reservoir
    fires_alone: bool | None = None  # the target fires somewhere in the window run alone
    centre_fires_alone: bool | None = None  # ... at the recorded firing token
    widened_by: int = 0  # left-context tokens added by window="widen"


@dataclass(frozen=True)
class Drawn:
    """A window as shown, where it came from, and (positives) the target's activation on each
    of its tokens (0.0 on left context added by ``widen``, which the harvest did not store)."""

    shown: Shown
    origin: ExampleOrigin
    acts: tuple[float, ...] = ()


# -- quantiles ----------------------------------------------------------------------------------
def quantile_bins(examples: Sequence[Any], n_bins: int) -> list[list[Any]]:
    """``examples`` ranked by activation (ascending, ties by position) in ``n_bins`` equal bins.

    Rank ``r`` of ``K`` goes to bin ``floor(r * n_bins / K)``; with fewer than ``n_bins``
    examples there are ``K`` bins of one.
    """
    ranked = sorted(examples, key=lambda e: (float(e.score), int(e.position)))
    k = len(ranked)
    n = min(n_bins, k)
    bins: list[list[Any]] = [[] for _ in range(n)]
    for r, e in enumerate(ranked):
        bins[r * n // k].append(e)
    return bins


def population_quantile(value: float, sorted_sample: Sequence[float]) -> float:
    """Mid-rank of ``value`` in a uniform sample of the population: ``(#< + #= / 2) / K``."""
    lo = bisect.bisect_left(sorted_sample, value)
    hi = bisect.bisect_right(sorted_sample, value)
    return (lo + (hi - lo) / 2) / max(1, len(sorted_sample))


def stratified_bins(n: int, n_bins: int, rng: random.Random) -> list[int]:
    """One bin per pick, ``floor((k + u_k) / n * n_bins)``: each bin has probability 1/n_bins."""
    return [min(int((k + rng.random()) / n * n_bins), n_bins - 1) for k in range(n)]


# -- windows ------------------------------------------------------------------------------------
def cut_at(ex: Any, max_tokens: int) -> tuple[Shown, int]:
    """The example's window (at most ``max_tokens``, around its firing) and the firing's index."""
    from spd_host.evals.llm.trials import Shown

    tokens, firings, centre = list(ex.tokens), list(ex.firings), int(ex.centre)
    start = 0
    if len(tokens) > max_tokens:
        start = max(0, min(centre - max_tokens // 2, len(tokens) - max_tokens))
        tokens, firings = tokens[start : start + max_tokens], firings[start : start + max_tokens]
    return Shown(tuple(tokens), tuple(bool(f) for f in firings)), centre - start


def alone(pool: Pool, key: str, shown: Shown, centre: int) -> tuple[bool, bool]:
    """(fires anywhere, fires at ``centre``) when the window is run alone."""
    f = pool.fires(key, shown.tokens)
    return any(f), bool(f[centre]) if 0 <= centre < len(f) else False


def widen(
    pool: Pool,
    key: str,
    ex: Any,
    shown: Shown,
    centre: int,
    bound: int,
    visible: Visible = "centre",
) -> tuple[Shown, int, int]:
    """``shown`` with left context from the harvest's sequence, doubled until the firing is
    visible alone (``visible``: at ``centre``, or anywhere in the window) or ``bound`` tokens
    were added (or the sequence starts).

    Returns (window, its centre, tokens added). The marks of a widened window are the
    target's firings *in context* (the sequence run from its start: the model is causal).
    """
    from spd_host.evals.llm.trials import Shown

    if pool.sequence is None:
        raise ConfigError(
            "window='widen' needs the harvest's token stream, and this harvest has none on record",
            hint="use window='prefer_alone' or 'as_recorded', or harvest from spd_host.data",
        )
    seq, off = pool.sequence(int(ex.position))
    left0 = centre  # tokens left of the firing in the window as shown
    right = len(shown.tokens) - centre - 1
    end = min(len(seq), off + right + 1)
    if tuple(seq[off - left0 : end]) != tuple(shown.tokens):
        raise ConfigError(
            f"the harvest's token stream at position {ex.position} no longer holds the "
            "example's window (the dataset or its tokenization changed since the harvest)",
            hint="use window='as_recorded' or 'prefer_alone', or harvest again",
        )
    added = 0
    step = max(1, left0)
    while True:
        step_to = min(bound, added + step, off - left0)
        if step_to <= added:
            return shown, centre, added
        added = step_to
        start = off - left0 - added
        tokens = tuple(seq[start:end])
        in_context = pool.fires(key, seq[:end])[start:end]
        cand = Shown(tokens, tuple(bool(x) for x in in_context))
        c = off - start
        shown, centre = cand, c
        any_alone, centre_alone = alone(pool, key, cand, c)
        if centre_alone if visible == "centre" else any_alone:
            return shown, centre, added
        step *= 2


# -- positives ----------------------------------------------------------------------------------
def _candidates(examples: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    top = [e for e in examples if getattr(e, "kind", "reservoir") == "top"]
    res = [e for e in examples if getattr(e, "kind", "reservoir") != "top"]
    return top, res


def draw_positives(
    pool: Pool,
    key: str,
    n: int,
    rng: random.Random,
    *,
    visible: Visible = "any",
    options: PopulationOptions | None = None,
) -> list[Drawn]:
    """Up to ``n`` activating examples of ``key`` as ``options`` says (see the module docstring).

    Each comes with its ``ExampleOrigin`` (role ``positive``, bin, estimated population
    quantile, whether its window alone reproduces the firing). ``visible`` is what
    ``prefer_alone``/``widen`` aim for: the firing token itself (``centre``) or any firing in
    the window (``any``). Scorers call this directly.
    """
    opts = options or pool.populations
    top, res = _candidates(pool.examples[key])
    if not top and not res:
        return []
    population = res or top
    sample = sorted(float(e.score) for e in population)
    if opts.positives == "quantiles":
        bins = quantile_bins(population, opts.n_quantiles)
        if res and top:  # top-K examples are the population's top: candidates of the top bin
            seen = {int(e.position) for e in bins[-1]}
            bins[-1] = bins[-1] + [e for e in top if int(e.position) not in seen]
    else:
        bins = _spread_bins([*top, *res], min(n, len(top) + len(res)), pool.act_type)
    wanted = (
        stratified_bins(n, len(bins), rng)
        if opts.positives == "quantiles"
        else list(range(len(bins)))
    )
    used: set[int] = set()
    if opts.window != "prefer_alone":
        _prefetch_picks(pool, bins, wanted, rng)
    out: list[Drawn] = []
    for b in wanted:
        got = _pick(pool, key, bins, b, used, rng, opts, visible)
        if got is None:
            continue
        ex, shown, centre, any_alone, centre_alone = got
        start = int(ex.centre) - centre
        acts = tuple(
            float(a) for a in ex.activations[pool.act_type][start : start + len(shown.tokens)]
        )
        widened = 0
        if opts.window == "widen" and not (centre_alone if visible == "centre" else any_alone):
            shown, centre, widened = widen(
                pool, key, ex, shown, centre, opts.max_widen_tokens, visible
            )
            any_alone, centre_alone = alone(pool, key, shown, centre)
            acts = (0.0,) * widened + acts
        used.add(int(ex.position))
        out.append(
            Drawn(
                shown,
                ExampleOrigin(
                    role="positive",
                    source="top" if getattr(ex, "kind", "") == "top" else "reservoir",
                    component=key,
                    position=int(ex.position),
                    activation=float(ex.score),
                    bin=b if opts.positives == "quantiles" else None,
                    n_bins=len(bins) if opts.positives == "quantiles" else None,
                    population_quantile=population_quantile(float(ex.score), sample),
                    fires_alone=any_alone,
                    centre_fires_alone=centre_alone,
                    widened_by=widened,
                ),
                acts,
            )
        )
    return out


def _spread_bins(examples: Sequence[Any], n: int, act_type: str) -> list[list[Any]]:
    """The pre-#15 rule: ``n`` equal bins of the pooled top-K and reservoir examples ranked by
    the peak ``act_type`` activation in their window."""
    if n <= 0:
        return []
    ranked = sorted(examples, key=lambda e: max(e.activations[act_type], default=0.0))
    return [ranked[i * len(ranked) // n : (i + 1) * len(ranked) // n] for i in range(n)]


def _order(bins: list[list[Any]], b: int) -> Iterator[int]:
    """Bin ``b``, then its neighbours outwards (a bin whose examples are all used lends)."""
    yield b
    for d in range(1, len(bins)):
        for c in (b - d, b + d):
            if 0 <= c < len(bins):
                yield c


def _pick(
    pool: Pool,
    key: str,
    bins: list[list[Any]],
    b: int,
    used: set[int],
    rng: random.Random,
    opts: PopulationOptions,
    visible: Visible,
) -> tuple[Any, Shown, int, bool, bool] | None:
    for c in _order(bins, b):
        free = [e for e in bins[c] if int(e.position) not in used]
        if not free:
            continue
        if opts.window != "prefer_alone":
            ex = rng.choice(free)
            shown, centre = cut_at(ex, pool.max_tokens)
            return (ex, shown, centre, *alone(pool, key, shown, centre))
        rng.shuffle(free)
        first: tuple[Any, Shown, int, bool, bool] | None = None
        tries = free[:_TRIES]
        for j, ex in enumerate(tries):
            if j % LOOKAHEAD == 0:  # the next few candidates share a forward
                pool.prefetch(
                    cut_at(e, pool.max_tokens)[0].tokens for e in tries[j : j + LOOKAHEAD]
                )
            shown, centre = cut_at(ex, pool.max_tokens)
            a, ca = alone(pool, key, shown, centre)
            if first is None:
                first = (ex, shown, centre, a, ca)
            if ca if visible == "centre" else a:
                return ex, shown, centre, a, ca
        return first
    return None


def _prefetch_picks(
    pool: Pool, bins: list[list[Any]], wanted: list[int], rng: random.Random
) -> None:
    """Announce the windows ``_pick`` will check (``as_recorded``/``widen``: one per wanted
    bin, chosen by ``rng`` alone), found by replaying the picks on a copy of ``rng``."""
    replay = random.Random()
    replay.setstate(rng.getstate())
    used: set[int] = set()
    windows = []
    for b in wanted:
        for c in _order(bins, b):
            free = [e for e in bins[c] if int(e.position) not in used]
            if free:
                ex = replay.choice(free)
                used.add(int(ex.position))
                windows.append(cut_at(ex, pool.max_tokens)[0].tokens)
                break
    pool.prefetch(windows)


# -- negatives ----------------------------------------------------------------------------------
def draw_negatives(
    pool: Pool,
    key: str,
    n: int,
    rng: random.Random,
    *,
    options: PopulationOptions | None = None,
) -> list[Drawn]:
    """Up to ``n`` windows on which ``key`` fires nowhere (checked), as ``options.negatives`` says."""
    opts = options or pool.populations
    out: list[Drawn] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(n):
        d = None
        if opts.negatives == "similar_density":
            dens = pool.density[key]
            similar = [
                k
                for k in pool.others(key)
                if abs(pool.density[k] - dens) <= opts.density_tolerance * dens
            ]
            d = _negative(pool, key, similar, None, rng, "similar_density", seen)
        if d is None:
            others = pool.others(key)
            weights = [pool.density[k] for k in others]
            d = _negative(pool, key, others, weights, rng, "random", seen)
        if d is None:
            break
        seen.add(d.shown.tokens)
        out.append(d)
    return out


def _negative(
    pool: Pool,
    key: str,
    candidates: Sequence[str],
    weights: Sequence[float] | None,
    rng: random.Random,
    source: Literal["random", "similar_density"],
    seen: set[tuple[int, ...]],
) -> Drawn | None:
    from spd_host.evals.llm.trials import unmarked

    if not candidates:
        return None
    # ``rng.choices(c, weights=w)`` is ``rng.choices(c, cum_weights=accumulate(w))``: the
    # running sums once per call, not once per draw
    candidates = list(candidates)
    cum = list(itertools.accumulate(weights)) if weights else None
    ahead = random.Random()  # runs ahead of ``rng`` on the same draws, to batch the checks
    ahead.setstate(rng.getstate())
    n_ahead = 0
    for j in range(_TRIES):
        if j == n_ahead:  # announce the windows of this try and the next few
            upto = min(_TRIES, j + LOOKAHEAD)
            tries = [_candidate(pool, candidates, cum, ahead, source) for _ in range(j, upto)]
            n_ahead = upto
            pool.prefetch(t[2].tokens for t in tries if t is not None and t[2].tokens not in seen)
        got = _candidate(pool, candidates, cum, rng, source)
        if got is None:
            continue
        other, ex, shown = got
        if shown.tokens in seen:
            continue
        if any(pool.fires(key, shown.tokens)):
            continue
        return Drawn(
            unmarked(shown),
            ExampleOrigin(
                role="negative",
                source=source,
                component=other,
                position=int(ex.position),
                fires_alone=False,
                centre_fires_alone=False,
            ),
        )
    return None


def _candidate(
    pool: Pool,
    candidates: Sequence[str],
    cum_weights: list[float] | None,
    rng: random.Random,
    source: str,
) -> tuple[str, Any, Shown] | None:
    """One negative candidate (component, example, window), or None for a component without
    examples; the draws do not depend on any firing check."""
    other = (
        rng.choices(candidates, cum_weights=cum_weights)[0]
        if cum_weights
        else rng.choice(candidates)
    )
    top, res = _candidates(pool.examples[other])
    examples = res or top if source == "random" else [*top, *res]
    if not examples:
        return None
    ex = rng.choice(examples)
    return other, ex, cut_at(ex, pool.max_tokens)[0]


# -- what a perfect judge could reach ------------------------------------------------------------
def trial_ceiling(origins: Sequence[ExampleOrigin], visible: Visible) -> float | None:
    """Balanced accuracy of a judge that answers exactly from the windows as shown.

    It calls a positive only when the positive's firing is visible in its window (``any``:
    the target fires somewhere in it alone; ``centre``: at the firing token) and never calls a
    negative (negatives are checked not to fire): ``(visible share + 1) / 2``.
    """
    pos = [o for o in origins if o.role == "positive"]
    if not pos:
        return None
    seen = [o.fires_alone if visible == "any" else o.centre_fires_alone for o in pos]
    tpr = sum(bool(s) for s in seen) / len(pos)
    has_neg = any(o.role == "negative" for o in origins)
    return (tpr + 1.0) / 2 if has_neg else tpr


# -- the harvest's token stream -------------------------------------------------------------------
class SequenceSource:
    """position -> the harvest sequence holding it, from the harvest's own batch source.

    Positions are ``global_batch * batch_size * seq_len + row * seq_len + offset`` (see
    ``spd_host.harvest.accumulator``); batches are read once each and cached.
    """

    def __init__(
        self,
        batches: Callable[[int, int, int], Iterator[torch.Tensor]],
        batch_size: int,
        seq_len: int,
    ) -> None:
        self._batches = batches
        self._b, self._s = batch_size, seq_len
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, position: int) -> tuple[list[int], int]:
        per_batch = self._b * self._s
        g, within = divmod(int(position), per_batch)
        if g not in self._cache:
            it = self._batches(0, 1, g)
            batch = next(iter(it), None)
            if batch is None:
                raise ConfigError(
                    f"the harvest's token stream ends before position {position}",
                    hint="the dataset changed since the harvest; use window='as_recorded'",
                )
            self._cache[g] = batch.to("cpu", torch.long)
        row, off = divmod(within, self._s)
        return [int(x) for x in self._cache[g][row].tolist()], off
