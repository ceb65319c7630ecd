"""The batched window-alone firing check gives exactly the one-window-at-a-time results.

The reference is a brute-force check written here: every window run alone through the toy's
base model (a forward hook reads the MLP input, the toy's encoder maths gives the pre-acts),
one forward per question, no cache. The suites are built once with it and once with the
batched, speculative ``FiringChecker`` path; trial ids, windows, marks, truth and every
example origin (chosen examples, fires_alone flags) must be equal, and so must the ceiling.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from spd_host.adapter import HarvestOptions
from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm import suites
from spd_host.evals.llm.firing_check import FiringChecker
from spd_host.evals.llm.suites import build_trials
from spd_host.plugins import get_host
from tests.evals.conftest import toy_batches
from tests.evals.test_judge_suites import _write_labels
from tests.evals.test_populations import _brute_fires


def _records(trials: list[Any]) -> list[Any]:
    return [
        (
            t.trial_id,
            t.key,
            [(i.tokens, i.marks) for i in t.items],
            sorted(t.truth),
            [o.model_dump() for o in t.extras.get("examples", [])],
        )
        for t in trials
    ]


def _brute_checker(calls: list[int]) -> Any:
    """``suites._firing_checker`` replaced by one forward per question (the reference)."""

    def make(adapter: Any, threshold: float, batch_size: int = 32) -> Any:
        model = adapter.load_base_model()

        def fires(key: str, tokens: Any) -> list[bool]:
            calls.append(1)
            return [bool(x) for x in _brute_fires(model, key, tokens)]

        return fires

    return make


CASES: list[tuple[str, dict[str, Any]]] = [
    ("detection", {}),
    ("detection", {"negatives": "similar_density"}),
    ("detection", {"window": "prefer_alone"}),
    ("fuzzing", {}),
    ("fuzzing", {"window": "widen", "max_widen_tokens": 8}),
    ("fuzzing", {"convention": "delphi", "fuzz_type": "default"}),
    ("fuzzing", {"convention": "delphi", "fuzz_type": "active"}),
    ("intruder", {}),
]


@pytest.mark.slow
def test_batched_build_equals_one_window_at_a_time(
    harvested: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    base = JudgeSuiteConfig(provider="offline", n_components=6, n_trials=2)
    n_widened = 0
    for kind, update in CASES:
        cfg = base.model_copy(update=update)
        batches = toy_batches if cfg.window == "widen" else None
        batched, skipped_b, _ = build_trials(kind, adapter, cfg, batches=batches)
        calls: list[int] = []
        with monkeypatch.context() as m:
            m.setattr(suites, "_firing_checker", _brute_checker(calls))
            brute, skipped_r, _ = build_trials(kind, adapter, cfg, batches=batches)
        assert calls, "the reference checker was not used"
        assert batched and _records(batched) == _records(brute), (kind, update)
        assert skipped_b == skipped_r
        n_widened += sum(o.widened_by > 0 for t in batched for o in t.extras.get("examples", []))
    assert n_widened > 0  # the widen case really widened


def test_the_ceiling_and_records_of_a_run_are_unchanged(
    harvested: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_labels(harvested)
    cfg = JudgeSuiteConfig(provider="offline", n_components=5, n_trials=2, force=True)
    batched = run_suite("detection", harvested, cfg)
    with monkeypatch.context() as m:
        m.setattr(suites, "_firing_checker", _brute_checker([]))
        brute = run_suite("detection", harvested, cfg)
    assert batched.ceiling == brute.ceiling and batched.ceiling is not None
    assert batched.positives_visible == brute.positives_visible
    assert [r.examples for r in batched.trials] == [r.examples for r in brute.trials]
    assert [(r.trial_id, r.truth, r.predicted) for r in batched.trials] == [
        (r.trial_id, r.truth, r.predicted) for r in brute.trials
    ]


def test_checker_batches_by_length_and_answers_like_brute_force(harvested: str) -> None:
    """Windows of mixed lengths, asked in any order, for components of every site: the same
    answers as one forward each, from one forward per length group and batch."""
    from spd_host.harvest import HarvestRepo

    adapter = get_host().load_adapter(harvested)
    model = adapter.load_base_model()
    check = suites._firing_checker(adapter, float(HarvestRepo.open(harvested).config.threshold), 4)
    g = torch.Generator().manual_seed(7)
    windows = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (9, 9, 5, 9, 9, 9, 5, 12)]
    check.prefetch(windows)
    assert check.windows_run == 8 and check.forwards == 4  # 9 x5 -> 4+1, 5 x2 -> 1, 12 -> 1
    keys = sorted(HarvestRepo.open(harvested).summary(), key=lambda c: -c.density)
    for w in windows:
        for c in keys[:: max(1, len(keys) // 12)]:
            assert check(c.key, w) == _brute_fires(model, c.key, w)
    assert check.forwards == 4  # every answer came from the cache
    with check.speculating():
        assert check(keys[0].key, [1, 2, 3]) == [False] * 3  # a guess, queued
    assert check.misses == 1 and check.pending == 1
    check.flush()
    assert check(keys[0].key, [1, 2, 3]) == _brute_fires(model, keys[0].key, [1, 2, 3])


def test_a_batch_dependent_decomposition_runs_one_window_per_forward(harvested: str) -> None:
    """BatchTopK-style activations depend on the tokens encoded together: never batched."""
    adapter = get_host().load_adapter(harvested)
    fn = get_host().harvest_fn(adapter, HarvestOptions(next_token=False))
    shapes: list[list[int]] = []

    def recorded(tokens: torch.Tensor) -> Any:
        shapes.append(list(tokens.shape))
        return fn(tokens)

    check = FiringChecker(recorded, "cpu", batch_size=16, batch_dependent=True)
    check.prefetch([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert shapes == [[1, 3]] * 3


def test_scorer_draws_through_build_pool_are_unchanged(
    harvested: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scorer draws component by component (no speculative pass): the look-ahead batches of
    positives and negative candidates must leave every draw as the per-window check makes it."""
    from spd_host.evals.llm.suites import build_pool

    adapter = get_host().load_adapter(harvested)

    def draws(pool: Any) -> list[Any]:
        out = []
        for key in sorted(k for k, d in pool.density.items() if d > 0)[:6]:
            rng = random.Random(key)
            for d in [*pool.positives(key, 5, rng, "centre"), *pool.negatives(key, 5, rng)]:
                out.append((d.shown, d.origin.model_dump(), d.acts))
        return out

    for update in ({}, {"window": "prefer_alone", "negatives": "similar_density"}):
        cfg = JudgeSuiteConfig(**update)
        batched_pool = build_pool(adapter, cfg)
        assert isinstance(batched_pool.fires, FiringChecker)
        batched = draws(batched_pool)
        assert batched_pool.fires.forwards < batched_pool.fires.windows_run
        with monkeypatch.context() as m:
            m.setattr(suites, "_firing_checker", _brute_checker([]))
            brute = draws(build_pool(adapter, cfg))
        assert batched and batched == brute, update
