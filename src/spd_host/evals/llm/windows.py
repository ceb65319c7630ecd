"""The windows the simulation, embedding and surprisal scorers show: which, and their truth.

Per component (delphi's populations): windows from the top-activating examples, activating
windows drawn by activation quantile and windows on which the component does not fire at all
(checked by running the method's HarvestFn on the window as shown; their true activation is 0
everywhere, as delphi's), both through :mod:`spd_host.evals.llm.populations`. Windows are
cut around the recorded firing centre.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from spd_host.adapter import DecompositionAdapter
from spd_host.errors import ResultsNotFoundError
from spd_host.evals.llm.populations import PopulationOptions
from spd_host.evals.llm.trials import Pool

WindowKind = Literal["top", "quantile", "non-activating"]
MAX_LEVEL = 10


@dataclass(frozen=True)
class Window:
    tokens: tuple[int, ...]
    activations: tuple[float, ...]  # raw, of the adapter's first activation type; 0 for negatives
    kind: WindowKind
    quantile: int  # activating: its bin (0 = lowest; top windows: n_quantiles); else -1
    fires_alone: bool | None = None  # the target fires somewhere in the window run alone

    @property
    def activating(self) -> bool:
        return self.kind != "non-activating"


def cut_window(ex: Any, max_tokens: int, act_type: str, kind: WindowKind, quantile: int) -> Window:
    """At most ``max_tokens`` of the example around its recorded firing centre (as
    :func:`spd_host.evals.llm.trials.cut` cuts them), with the activations."""
    tokens, acts, centre = list(ex.tokens), list(ex.activations[act_type]), int(ex.centre)
    if len(tokens) > max_tokens:
        start = max(0, min(centre - max_tokens // 2, len(tokens) - max_tokens))
        tokens, acts = tokens[start : start + max_tokens], acts[start : start + max_tokens]
    return Window(tuple(tokens), tuple(float(a) for a in acts), kind, quantile)


def levels(activations: Sequence[float], max_activation: float) -> list[int]:
    """Activations on delphi's 0-10 scale: ``ceil(10 * a / max).clamp(0, 10)`` with ``max``
    the component's largest recorded activation (floored at 1e-6)."""
    top = max(max_activation, 1e-6)
    return [min(MAX_LEVEL, max(0, math.ceil(MAX_LEVEL * a / top))) for a in activations]


def max_activation(examples: Sequence[Any], act_type: str) -> float:
    return max((max(e.activations[act_type], default=0.0) for e in examples), default=0.0)


def draw_windows(
    pool: Pool,
    key: str,
    rng: random.Random,
    *,
    n_top: int,
    n_quantile: int,
    n_nonactivating: int,
    top_examples: Sequence[Any],
) -> list[Window] | str:
    """The windows of one trial of ``key``, or why none can be drawn: ``n_top`` top-activating
    examples, ``n_quantile`` positives and ``n_nonactivating`` negatives drawn as the pool's
    population options say (:func:`spd_host.evals.llm.populations.draw_positives` /
    ``draw_negatives``: positives by activation quantile of the reservoir, negatives that
    never fire), shuffled."""
    from spd_host.evals.llm.populations import draw_negatives, draw_positives

    if not pool.examples[key]:
        return "no examples"
    act = pool.act_type
    out: list[Window] = []
    seen: set[tuple[int, ...]] = set()
    for ex in rng.sample(list(top_examples), min(n_top, len(top_examples))):
        w = cut_window(ex, pool.max_tokens, act, "top", pool.populations.n_quantiles)
        if w.tokens not in seen:
            seen.add(w.tokens)
            out.append(w)
    for d in draw_positives(pool, key, n_quantile, rng) if n_quantile else []:
        if d.shown.tokens in seen:
            continue
        seen.add(d.shown.tokens)
        b = -1 if d.origin.bin is None else d.origin.bin
        out.append(Window(d.shown.tokens, d.acts, "quantile", b, d.origin.fires_alone))
    negatives = draw_negatives(pool, key, n_nonactivating, rng) if n_nonactivating else []
    for d in negatives:
        zeros = (0.0,) * len(d.shown.tokens)
        out.append(Window(d.shown.tokens, zeros, "non-activating", -1, False))
    if n_nonactivating and not negatives:
        return "no window found on which it does not fire"
    rng.shuffle(out)
    return out


@dataclass
class Setup:
    """What every local scorer reads: the harvest, the labels, the pool, the components."""

    repo: Any
    pool: Pool
    labels: dict[str, str]
    baseline_labels: bool
    chosen: list[str]
    decode: Callable[[list[int]], str]
    max_activation: Callable[[str], float]
    top_examples: Callable[[str], list[Any]]


def prepare(
    adapter: DecompositionAdapter,
    suite: str,
    *,
    populations: Any = None,
    harvest_run: str | None,
    label_model: str | None,
    max_tokens: int,
    n_components: int | None,
    seed: int,
) -> Setup:
    """Open the harvest and labels and pick the scored components (seeded, as the judge suites)."""
    from spd_host.evals.llm.suites import _decoder, _firing_checker, _labels, _open_harvest

    repo = _open_harvest(adapter, harvest_run)
    summary = repo.summary()
    labels, baseline = _labels(adapter.decomposition_id, label_model)
    if not labels:
        raise ResultsNotFoundError(
            f"the {suite} suite scores labels, and {adapter.decomposition_id!r} has none",
            hint=f"run `spd-host autointerp {adapter.decomposition_id}` first",
        )
    details: dict[str, Any] = {}

    def detail(key: str) -> Any:
        if key not in details:
            details[key] = repo.component(key)
        return details[key]

    act_type = adapter.activation_types[0]
    pool = Pool(
        density={c.key: c.density for c in summary},
        site={c.key: c.site for c in summary},
        fires=_firing_checker(adapter, float(getattr(repo.config, "threshold", 0.0))),
        act_type=act_type,
        load_examples=lambda k: [*detail(k).top_examples, *detail(k).reservoir_examples],
        max_tokens=max_tokens,
        populations=populations or PopulationOptions(),
    )
    eligible = sorted(c.key for c in summary if c.density > 0 and c.key in labels)
    random.Random(seed).shuffle(eligible)
    chosen = sorted(eligible[:n_components] if n_components else eligible)
    tokenizer = repo.tokenizer if hasattr(repo, "tokenizer") else None
    return Setup(
        repo=repo,
        pool=pool,
        labels=labels,
        baseline_labels=baseline,
        chosen=chosen,
        decode=_decoder(tokenizer),
        max_activation=lambda k: max_activation(pool.examples[k], act_type),
        top_examples=lambda k: list(detail(k).top_examples),
    )


def populations_of(config: Any) -> PopulationOptions:
    """The population options a scorer config carries (defaults for the fields it lacks)."""
    fields = ("positives", "n_quantiles", "negatives", "density_tolerance")
    return PopulationOptions(**{f: getattr(config, f) for f in fields if hasattr(config, f)})
