"""A plugin's HarvestFn that breaks the HarvestBatch contract: each way is a one-line
``HarvestBatchError`` naming the plugin and what to do, raised before any statistic is
corrupted. One row per bad output; ``bad_plugin.MODE`` selects it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from spd_host.adapter import (
    MAX_ABS_ACTIVATION,
    HarvestBatch,
    Site,
    next_token_topk_of,
    validate_harvest_batch,
)
from spd_host.errors import HarvestBatchError, PluginError
from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
from spd_host.harvest.accumulator import SUM_FRAC_BITS
from spd_host.harvest.exact import split_fixed
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin
from tests.robustness import bad_plugin

CONFIG = dict(
    n_tokens=192, batch_size=4, seq_len=12, examples_per_component=3, context_tokens=2,
    output_top_k=5, min_token_support=1,
)  # fmt: skip

CASES = [
    ("none", "returned None, expected a HarvestBatch"),
    ("substituted_tokens", "tokens differ from the tokens passed in"),
    ("nan_logits", "next_token_logits contains NaN or +inf"),
    ("inf_logits", "next_token_logits contains NaN or +inf"),
    ("probs_not_summing_to_1", "next_token_probs do not sum to 1"),
    ("negative_probs", "next_token_probs has values outside [0, 1]"),
    ("topk_over_1", "next_token_topk probabilities sum past 1"),
    ("topk_nan", "next_token_topk.values contains NaN or +inf"),
    ("deferred_topk_over_1", "next_token_topk probabilities sum past 1"),
    ("deferred_vocab_lies", "is over 23 tokens, it announced 24"),
    ("vocab_smaller_than_token_ids", "tokens has ids outside [0, 18)"),
    ("vocab_changes", "vocabulary changed from 23 to 24 tokens"),
    ("huge_activation", "has values of magnitude 2e+09"),
]


@pytest.fixture
def bad_host() -> Iterator[None]:
    with temporary_plugins(("bad", bad_plugin), entry_points=False):
        yield


def _harvest(out: Path, mode: str) -> HarvestRepo | None:
    bad_plugin.MODE = mode
    try:
        return run_harvest(
            "bad:demo",
            HarvestConfig(**CONFIG),  # type: ignore[arg-type]
            out=out,
            batches=toy_plugin.toy_source(4, 12),
            progress=False,
        )
    finally:
        bad_plugin.MODE = "none"


@pytest.mark.parametrize(("mode", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_batch_is_a_named_one_line_error(
    bad_host: None, tmp_path: Path, mode: str, fragment: str
) -> None:
    with pytest.raises(HarvestBatchError) as info:
        _harvest(tmp_path / "out", mode)
    err = info.value
    assert "\n" not in err.message, err.message
    assert err.message.startswith("plugin 'bad' returned an invalid HarvestBatch"), err.message
    assert fragment in err.message, err.message
    assert err.hint and "plugin" in err.hint
    assert not (tmp_path / "out" / "result.json").exists()  # nothing was written as finished


def test_a_failing_deferred_top_k_is_a_plugin_error(bad_host: None, tmp_path: Path) -> None:
    """Raised on the accumulation thread, reported like a failing HarvestFn: one line naming
    the plugin, nothing written as finished."""
    with pytest.raises(PluginError) as info:
        _harvest(tmp_path / "out", "deferred_fails")
    msg = info.value.message
    assert "\n" not in msg and msg.startswith("plugin 'bad' harvest_fn failed"), msg
    assert "deferred next-token top-k" in msg and "ran out of memory" in msg, msg
    assert not (tmp_path / "out" / "result.json").exists()


def test_a_large_per_batch_sum_of_representable_values_is_exact(
    bad_host: None, tmp_path: Path
) -> None:
    """Each value below 2**30, the batch's sum far past 1e9: summed exactly, no error."""
    repo = _harvest(tmp_path / "out", "large_batch_sum")
    assert repo is not None
    s = repo.component(f"{toy_plugin.SITES[0][0]}:0")
    assert s.firing_count * 5.0e8 > 1e10  # the case the issue reported as an OverflowError
    assert s.mean_firing["act"] == 5.0e8 and s.max_firing["act"] == 5.0e8
    assert s.mean_all["act"] == pytest.approx(5.0e8 * s.firing_count / repo.n_tokens, rel=1e-12)


def test_threshold_nan_is_refused_by_the_config() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError):
            HarvestConfig(threshold=bad)
    assert HarvestConfig(threshold=0.5).threshold == 0.5


def test_the_activation_bound_is_what_the_exact_sums_hold() -> None:
    """The validator's bound and the accumulator's fixed point agree: the largest float32
    below the bound is summed (either sign), the bound itself is not representable."""
    bound = torch.tensor([MAX_ABS_ACTIVATION], dtype=torch.float32)
    below = torch.nextafter(bound, torch.zeros(1))
    q, _ = split_fixed(torch.cat([below, -below]), SUM_FRAC_BITS)
    assert q.tolist() == [int(below) << SUM_FRAC_BITS, -(int(below) << SUM_FRAC_BITS)]
    with pytest.raises(OverflowError):
        split_fixed(-bound, SUM_FRAC_BITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_honest_low_precision_outputs_pass(dtype: torch.dtype) -> None:
    """No false alarms: a softmax or top-k computed in half precision over a large
    vocabulary, with masked (-inf) logits, is accepted."""
    g = torch.Generator().manual_seed(0)
    B, S, V, C = 2, 3, 5000, 4
    logits = (4 * torch.randn(B, S, V, generator=g)).to(dtype)
    logits[..., -7:] = float("-inf")
    acts = torch.relu(torch.randn(B, S, C, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, S), generator=g)
    site = [Site(name="s", n_components=C, reads_from="a", writes_to=("b",))]
    for nt in (
        {"next_token_logits": logits},
        {"next_token_probs": torch.softmax(logits.float(), -1).to(dtype)},
        {"next_token_topk": next_token_topk_of(logits, 16)},
    ):
        batch = HarvestBatch(
            tokens=tokens.clone(), firings={"s": acts > 0}, activations={"s": {"a": acts}}, **nt
        )
        n = validate_harvest_batch(
            batch, sites=site, activation_types=["a"], plugin="p", input_tokens=tokens,
            vocab_size=V, min_top_k=16,
        )  # fmt: skip
        assert n == V
