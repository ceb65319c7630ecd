"""Building judge trials from a harvest: which examples, which negatives, which highlights.

Rules that make the scores mean what they say:

- intruder: 4 real examples of the target + 1 example of another component whose firing
  density is within a relative tolerance of the target's, and which, as shown, does not make
  the target fire (checked by running the method's HarvestFn on the shown window);
- detection: activating examples of the target drawn by population quantile, and negatives
  that truly do not fire the target (same HarvestFn check); see ``populations`` for the
  named options (``positives``, ``negatives``, ``window``);
- fuzzing: activating examples drawn the same way; some marked at their real firings, the
  others at as many random positions where the target does *not* fire;
- every detection/fuzzing item carries its ``ExampleOrigin`` in ``Trial.extras["examples"]``
  (in the order shown), including whether its window alone reproduces the firing;
- windows are cut around their recorded firing centre (``ActivationExample.centre``), never
  at ``len // 2``.

Fuzzing also comes in delphi's two modes (``FuzzingScorer.fuzz_type``) and with delphi's marking
rule (``scorers/classifier/sample.py``), see :func:`fuzzing_trial`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from spd_host.evals.llm.populations import (
    Drawn,
    ExampleOrigin,
    PopulationOptions,
    SequenceFn,
    draw_negatives,
    draw_positives,
)

Kind = Literal["intruder", "detection", "fuzzing"]
FuzzType = Literal["spd-host", "default", "active"]
MarkRule = Literal["firing", "delphi"]
FiresFn = Callable[[str, Sequence[int]], list[bool]]  # (key, tokens) -> per-token firing of key


@dataclass(frozen=True)
class Shown:
    """One example as the judge sees it."""

    tokens: tuple[int, ...]
    marks: tuple[bool, ...]


@dataclass
class Trial:
    trial_id: str
    key: str
    kind: Kind
    items: list[Shown]
    truth: frozenset[int]  # 1-based indices of the "positive" items
    label: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _window(ex: Any, max_tokens: int) -> slice:
    n, centre = len(ex.tokens), int(ex.centre)
    if n <= max_tokens:
        return slice(0, n)
    start = max(0, min(centre - max_tokens // 2, n - max_tokens))
    return slice(start, start + max_tokens)


def cut(ex: Any, max_tokens: int) -> Shown:
    """The example's window, at most ``max_tokens`` long, around its recorded firing centre."""
    w = _window(ex, max_tokens)
    return Shown(tuple(ex.tokens[w]), tuple(bool(f) for f in ex.firings[w]))


def cut_activations(ex: Any, max_tokens: int, act_type: str) -> list[float]:
    """The activations of the window :func:`cut` shows."""
    return [float(a) for a in ex.activations[act_type][_window(ex, max_tokens)]]


def unmarked(s: Shown) -> Shown:
    return Shown(s.tokens, tuple(False for _ in s.tokens))


def spread(examples: Sequence[Any], n: int, rng: random.Random, act_type: str) -> list[Any]:
    """``n`` examples, one from each of ``n`` equal bins of increasing peak activation."""
    ranked = sorted(examples, key=lambda e: max(e.activations[act_type], default=0.0))
    if len(ranked) <= n:
        return list(ranked)
    return [rng.choice(ranked[i * len(ranked) // n : (i + 1) * len(ranked) // n]) for i in range(n)]


@dataclass
class Pool:
    """What trial builders need from the harvest: examples and densities per component.

    ``load_examples(key)`` is called lazily (and cached): only the components a trial touches
    are read from the harvest.
    """

    density: dict[str, float]
    site: dict[str, str]
    fires: FiresFn
    act_type: str
    load_examples: Callable[[str], list[Any]]
    max_tokens: int = 64
    populations: PopulationOptions = field(default_factory=PopulationOptions)
    sequence: SequenceFn | None = None
    """position -> its harvest sequence (for ``window="widen"``); None when not on record."""
    _cache: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def examples(self) -> _Examples:
        return _Examples(self)

    def positives(self, key: str, n: int, rng: random.Random, visible: Any = "any") -> list[Drawn]:
        """``populations.draw_positives`` with this pool's options."""
        return draw_positives(self, key, n, rng, visible=visible)

    def negatives(self, key: str, n: int, rng: random.Random) -> list[Drawn]:
        """``populations.draw_negatives`` with this pool's options."""
        return draw_negatives(self, key, n, rng)

    def prefetch(self, windows: Iterable[Sequence[int]]) -> None:
        """Announce windows about to be checked, so a batching checker (``FiringChecker``)
        runs them in one forward; a plain ``fires`` function needs nothing."""
        announce = getattr(self.fires, "prefetch", None)
        if announce is not None:
            announce(list(windows))

    def others(self, key: str) -> list[str]:
        return [k for k, d in self.density.items() if k != key and d > 0]

    def negative(self, key: str, candidates: Sequence[str], rng: random.Random) -> Shown | None:
        """A window from one of ``candidates`` on which ``key`` does not fire anywhere."""
        for _ in range(40):
            if not candidates:
                return None
            other = rng.choice(list(candidates))
            pool = self.examples[other]
            if not pool:
                continue
            shown = cut(rng.choice(pool), self.max_tokens)
            if not any(self.fires(key, shown.tokens)):
                return shown
        return None


class _Examples:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def __getitem__(self, key: str) -> list[Any]:
        cache = self._pool._cache
        if key not in cache:
            cache[key] = list(self._pool.load_examples(key))
        return cache[key]


def intruder_trial(
    pool: Pool, key: str, idx: int, rng: random.Random, *, n_real: int, tolerance: float
) -> Trial | str:
    """A trial, or the reason none can be built."""
    reals = pool.examples[key]
    if len(reals) < n_real:
        return f"fewer than {n_real} examples"
    d = pool.density[key]
    similar = [k for k in pool.others(key) if abs(pool.density[k] - d) <= tolerance * d]
    same_site = [k for k in similar if pool.site[k] == pool.site[key]]
    intruder = pool.negative(key, same_site, rng) or pool.negative(key, similar, rng)
    if intruder is None:
        return (
            f"no component within {tolerance:.0%} of its density has a window it does not fire on"
        )
    shown = [cut(e, pool.max_tokens) for e in rng.sample(reals, n_real)]
    pos = rng.randint(0, n_real)
    shown.insert(pos, intruder)
    return Trial(f"intruder:{key}:{idx}", key, "intruder", shown, frozenset({pos + 1}))


def detection_trial(
    pool: Pool, key: str, idx: int, rng: random.Random, *, n_pos: int, n_neg: int, label: str
) -> Trial | str:
    if len(pool.examples[key]) < 1:
        return "no examples"
    pos = pool.positives(key, n_pos, rng, visible="any")
    neg = pool.negatives(key, n_neg, rng)
    if not neg:
        return "no window found on which it does not fire"
    items = [(Drawn(unmarked(d.shown), d.origin, d.acts), True) for d in pos]
    items += [(d, False) for d in neg]
    rng.shuffle(items)
    truth = frozenset(i + 1 for i, (_, p) in enumerate(items) if p)
    return Trial(
        f"detection:{key}:{idx}",
        key,
        "detection",
        [d.shown for d, _ in items],
        truth,
        label,
        extras={"examples": _numbered([d.origin for d, _ in items])},
    )


def _numbered(origins: Sequence[ExampleOrigin]) -> list[ExampleOrigin]:
    return [o.model_copy(update={"item": i}) for i, o in enumerate(origins, 1)]


def threshold_marks(acts: Sequence[float], fraction: float) -> tuple[bool, ...]:
    """delphi's marks on an activating example: every token whose activation is at least
    ``fraction`` (delphi: 0.3) times the example's own maximum."""
    top = max(acts, default=0.0)
    return tuple(a >= fraction * top for a in acts)


def _mismarked(
    shown: Shown,
    k: int,
    rng: random.Random,
    *,
    rule: MarkRule,
    acts: Sequence[float] | None,
    real: Sequence[bool],
    fraction: float,
) -> Shown | None:
    """``shown`` marked at ``k`` wrong tokens (fewer if fewer qualify; None if none does).

    ``firing``: tokens where the component fires neither in the harvest record nor in the
    window as shown, picked with ``rng``. ``delphi`` (``sample._prepare_text``): tokens whose
    activation is at most ``fraction`` x the example's maximum (all tokens of a window it never
    fires on); the token at ``n - n // 4`` (where delphi's windows put the firing) first when it
    qualifies, the rest by ``random.sample`` after delphi's ``random.seed(22)``, re-seeded for
    every example as delphi does.
    """
    n = len(shown.tokens)
    if rule == "firing":
        free = [j for j in range(n) if not (real[j] or shown.marks[j])]
        k = min(k, len(free))
        picked = set(rng.sample(free, k)) if k else set()
    else:
        values = list(acts) if acts is not None else [0.0] * n
        limit = fraction * max(values, default=0.0)
        free = [j for j in range(n) if values[j] <= limit]
        k = min(k, len(free))
        seeded = random.Random(22)
        anchor = n - n // 4
        if k and anchor in free:
            rest = [j for j in free if j != anchor]
            picked = {anchor, *seeded.sample(rest, k - 1)}
        else:
            picked = set(seeded.sample(free, k)) if k else set()
    if not picked:
        return None
    return Shown(shown.tokens, tuple(j in picked for j in range(n)))


def fuzzing_trial(
    pool: Pool,
    key: str,
    idx: int,
    rng: random.Random,
    *,
    n_examples: int,
    label: str,
    fuzz_type: FuzzType = "spd-host",
    mark_rule: MarkRule = "firing",
    mark_fraction: float = 0.3,
) -> Trial | str:
    """A fuzzing trial of ``n_examples`` items; the positives are the correctly marked ones.

    ``fuzz_type``: ``spd-host`` — activating examples, half marked right, the others wrong
    at as many tokens as they really fire on; delphi's ``default`` — ``ceil(n/2)`` activating
    examples marked right plus ``n//2`` windows the component never fires on, each marked at
    ``ceil(mean firing tokens of the activating examples)`` tokens; delphi's ``active`` —
    ``n//2`` activating examples each shown twice, once marked right and once marked wrong at
    that many tokens. ``mark_rule``: ``firing`` marks right at the recorded firings (and wrong
    where it fires nowhere); ``delphi`` marks right where the activation is at least
    ``mark_fraction`` x the example's maximum, wrong as in :func:`_mismarked`.
    """
    n_pos = {"spd-host": n_examples, "default": math.ceil(n_examples / 2)}.get(
        fuzz_type, n_examples // 2
    )
    chosen = pool.positives(key, n_pos, rng, visible="centre")
    if len(chosen) < (2 if fuzz_type == "spd-host" else 1):
        return f"fewer than {2 if fuzz_type == 'spd-host' else 1} examples"

    def right(d: Drawn) -> tuple[Shown, list[float]]:
        shown, acts = d.shown, list(d.acts)
        if mark_rule == "delphi":
            shown = Shown(shown.tokens, threshold_marks(acts, mark_fraction))
        return shown, acts

    def wrong(shown: Shown, acts: list[float] | None, k: int, recorded: Sequence[bool]) -> Any:
        real = [a or b for a, b in zip(pool.fires(key, shown.tokens), recorded, strict=True)]
        cleared = Shown(shown.tokens, tuple(recorded) if mark_rule == "firing" else shown.marks)
        return _mismarked(
            cleared, k, rng, rule=mark_rule, acts=acts, real=real, fraction=mark_fraction
        )

    # the items, each with where it came from (a wrongly marked item counts as a negative)
    items: list[tuple[Shown, bool, ExampleOrigin]] = []

    def as_negative(o: ExampleOrigin) -> ExampleOrigin:
        return o.model_copy(update={"role": "negative"})

    if fuzz_type == "spd-host":
        order = list(range(len(chosen)))
        rng.shuffle(order)
        correct = set(order[: len(chosen) // 2])
        for i, d in enumerate(chosen):
            shown, acts = right(d)
            if i in correct:
                items.append((shown, True, d.origin))
                continue
            # never mark a real firing: neither a recorded one nor one in the window as shown
            recorded = d.shown.marks
            bad = wrong(shown, acts, max(1, sum(recorded)), recorded)
            if bad is not None:
                items.append((bad, False, as_negative(d.origin)))
    else:
        rights = [(right(d), d.shown.marks, d.origin) for d in chosen]
        k = max(1, math.ceil(sum(sum(rec) for _, rec, _ in rights) / len(rights)))
        for (shown, acts), recorded, origin in rights:
            items.append((shown, True, origin))
            if fuzz_type == "active":
                bad = wrong(shown, acts, k, recorded)
                if bad is not None:
                    items.append((bad, False, as_negative(origin)))
        if fuzz_type == "default":
            for neg in pool.negatives(key, n_examples // 2, rng):
                blank = unmarked(neg.shown)
                bad = wrong(blank, None, k, blank.marks)
                if bad is not None:
                    items.append((bad, False, neg.origin))
    if not any(not ok for _, ok, _ in items):
        return "no example has a token it does not fire on"
    rng.shuffle(items)
    truth = frozenset(i + 1 for i, (_, ok, _) in enumerate(items) if ok)
    return Trial(
        f"fuzzing:{key}:{idx}",
        key,
        "fuzzing",
        [s for s, _, _ in items],
        truth,
        label,
        extras={"examples": _numbered([o for _, _, o in items])},
    )


def rebatch(trials: Sequence[Trial], n_shown: int, seed: str) -> list[Trial]:
    """delphi's batching: each component's items (of all its trials) shuffled together and
    asked ``n_shown`` at a time (``Classifier._batch``; the last prompt may hold fewer, where
    delphi's parser then fails the whole prompt). Trial ids become ``<kind>:<key>:b<j>``."""
    by_key: dict[str, list[Trial]] = {}
    for t in trials:
        by_key.setdefault(t.key, []).append(t)
    out: list[Trial] = []
    for key, group in by_key.items():
        items = [(s, i + 1 in t.truth, _origin(t, i)) for t in group for i, s in enumerate(t.items)]
        random.Random(f"{seed}:batch:{key}").shuffle(items)
        first = group[0]
        for j in range(0, len(items), n_shown):
            chunk = items[j : j + n_shown]
            truth = frozenset(i + 1 for i, (_, p, _) in enumerate(chunk) if p)
            origins = [o for _, _, o in chunk]
            out.append(
                Trial(
                    f"{first.kind}:{key}:b{j // n_shown}",
                    key,
                    first.kind,
                    [s for s, _, _ in chunk],
                    truth,
                    first.label,
                    extras=(
                        {"examples": _numbered([o for o in origins if o is not None])}
                        if all(o is not None for o in origins)
                        else {}
                    ),
                )
            )
    return out


def _origin(trial: Trial, i: int) -> ExampleOrigin | None:
    """The origin of a trial's ``i``-th item (0-based), when the trial records origins."""
    origins = trial.extras.get("examples") or []
    return origins[i] if i < len(origins) else None
