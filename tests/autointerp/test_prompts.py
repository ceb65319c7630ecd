"""Example selection, the two strategies' prompts, the offline baseline and answer parsing."""

from __future__ import annotations

import asyncio

import pytest
from factories import METHOD_DESCRIPTION, make_evidence

from spd_host.autointerp.answer import MalformedAnswerError, parse_answer
from spd_host.autointerp.evidence import ActivationExample, ComponentEvidence
from spd_host.autointerp.providers.base import ClientOptions, CompletionRequest
from spd_host.autointerp.providers.offline import PROVIDER as OFFLINE
from spd_host.autointerp.registry import get_strategy
from spd_host.autointerp.selection import ExampleSelection, select_examples
from spd_host.autointerp.strategies.formatting import fires_on, says


def ex(peak: float, fires: bool = True) -> ActivationExample:
    return ActivationExample(
        tokens=("a", "b", "c"),
        activations=(0.0, peak, 0.0),
        firings=(False, fires, False),
        centre=1,
    )


def test_selection_top_then_one_per_equal_count_stratum() -> None:
    # peaks 10..1 shuffled; one non-firing example must never be chosen
    peaks = [3, 10, 7, 1, 9, 5, 2, 8, 6, 4]
    examples = [ex(p) for p in peaks] + [ex(100, fires=False)]
    sel = ExampleSelection(n_top=2, n_quantiles=4, per_quantile=1, seed=1)
    chosen = [e.max_activation for e in select_examples(examples, sel, key="k")]
    assert chosen[:2] == [10, 9]
    strata = [{8, 7}, {6, 5}, {4, 3}, {2, 1}]  # the remaining 8 by rank, 2 per stratum
    assert len(chosen) == 6 and all(v in s for v, s in zip(chosen[2:], strata, strict=True))
    # deterministic per (seed, key); across seeds every member of a stratum gets picked
    assert chosen == [e.max_activation for e in select_examples(examples, sel, key="k")]
    seen = {
        select_examples(examples, sel.model_copy(update={"seed": s}), key="k")[2].max_activation
        for s in range(40)
    }
    assert seen == {8, 7}


def test_selection_with_few_examples_takes_what_exists() -> None:
    examples = [ex(1.0), ex(2.0)]
    out = select_examples(
        examples, ExampleSelection(n_top=1, n_quantiles=4, per_quantile=3), key="k"
    )
    assert [e.max_activation for e in out] == [2.0, 1.0]


def test_delimiters_and_next_token_view() -> None:
    e = ActivationExample(
        tokens=("The", " cat", " sat", "\n", "Then"),
        activations=(0, 1, 1, 0, 1),
        firings=(False, True, True, False, True),
        centre=1,
    )
    assert fires_on(e) == "The<< cat sat>>⏎<<Then>>"
    assert says(e) == "The cat<< sat⏎>>Then"


@pytest.mark.parametrize("name", ["compact_skeptical", "dual_view"])
def test_strategies_show_all_evidence(name: str) -> None:
    ev = make_evidence(5)
    ev = ev.model_copy(update={"dataset": "my-org/some-unknown-dataset"})
    prompt = get_strategy(name).prompt(ev)
    text = prompt.user
    assert METHOD_DESCRIPTION in prompt.system  # the method blurb from the adapter, verbatim
    assert "MLP input in block 3 of 4" in text and "3.mlp_in" in text
    assert "my-org/some-unknown-dataset" in text  # any dataset name is shown as given
    assert "1% of tokens (about 1 in 100)" in text  # firing density
    assert "' MARK5': 3.00" in text  # input PMI
    assert "' MARK5': 90%" in text  # input precision
    assert "' sat': 40%" in text  # output precision
    assert "The cat<< MARK5 sat>>⏎" in text  # firing tokens delimited
    if name == "dual_view":
        assert "The cat MARK5<< sat⏎>>" in text  # what the model produces next
        assert text.index("Output side") < text.index("Input side")


def test_offline_baseline_is_deterministic_and_labelled_as_baseline() -> None:
    ev: ComponentEvidence = make_evidence(2)
    client = OFFLINE.make_client(ClientOptions(model=OFFLINE.default_model))
    req = CompletionRequest(system="", prompt="", schema={}, max_output_tokens=10, evidence=ev)
    a = asyncio.run(client.complete(req))
    b = asyncio.run(client.complete(req))
    assert a == b and OFFLINE.baseline
    # top input PMI: ' MARK2' (3.0) > ' cat' (1.0); output tie at 2.0 broken by token string
    assert a.answer.label == "baseline: reads ' MARK2'/' cat'; predicts ' on'/' sat'"
    assert a.answer.confidence == "low" and "not an LLM" in a.answer.reasoning


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ('{"label": "x", "confidence": "high"', "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"label": "x", "confidence": "sure", "reasoning": "r"}', "confidence"),
        ('{"label": "x", "confidence": "low", "reasoning": "r", "extra": 1}', "extra"),
        ('{"label": "", "confidence": "low", "reasoning": "r"}', "label"),
    ],
)
def test_parse_answer_rejects(payload: str, fragment: str) -> None:
    with pytest.raises(MalformedAnswerError, match=fragment):
        parse_answer(payload)


def test_parse_answer_accepts_fenced_json_and_flags_truncation() -> None:
    ok = parse_answer('```json\n{"label": " Cats ", "confidence": "low", "reasoning": "r"}\n```')
    assert ok.label == "Cats"
    with pytest.raises(MalformedAnswerError, match="cut off"):
        parse_answer('{"label": "x", "confidence": "low", "reasoning": "r"}', truncated=True)


def test_location_descriptions_use_the_topology_grammar() -> None:
    from spd_host.autointerp.bridge import describe_location

    assert describe_location("3.glu.down", 12) == "MLP down-projection in block 3 of 12"
    assert describe_location("3.mlp_in", None) == "MLP input (after its layer norm) in block 3"
    assert describe_location("not-canonical", 4) == "not-canonical"
