"""The rich_examples and canon strategies, the example renderings every strategy can use, and
the cacheable split of every built-in prompt (shared system prompt, per-component user part).
Expected renderings are written out by hand; XML is checked by parsing it back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from factories import METHOD_DESCRIPTION, make_evidence

from spd_host.autointerp.evidence import ActivationExample
from spd_host.autointerp.registry import get_strategy, list_strategies
from spd_host.autointerp.strategies.rendering import (
    ExampleRendering,
    describe_rendering,
    render_example,
    render_examples,
)

EX = ActivationExample(
    tokens=("The", " cat", " sat", "\n", "Then"),
    activations=(0.0, 0.5, 1.5, 0.0, 2.0),
    firings=(False, True, True, False, True),
    centre=1,
)
BUILTINS = ["compact_skeptical", "dual_view", "rich_examples", "canon"]


@pytest.mark.parametrize(
    ("rendering", "want"),
    [
        (ExampleRendering(), "The<< cat sat>>⏎<<Then>>"),
        (ExampleRendering(format="single_line"), "The [[[cat]]] [[[sat]]]⏎[[[Then]]]"),
        (
            ExampleRendering(format="single_line", annotate=True),
            "The [[[cat]]] (act:0.5) [[[sat]]] (act:1.5)⏎[[[Then]]] (act:2)",
        ),
        (
            ExampleRendering(format="single_line", annotate=True, delimiter="angle"),
            "The <<<cat (act:0.5)>>> <<<sat (act:1.5)>>>⏎<<<Then (act:2)>>>",
        ),
    ],
)
def test_line_renderings(rendering: ExampleRendering, want: str) -> None:
    assert render_example(EX, rendering, 400) == want


def test_shifted_view_marks_the_next_token_with_the_firing_activation() -> None:
    r = ExampleRendering(format="single_line", annotate=True)
    # firing at ' cat' (0.5) and ' sat' (1.5) mark ' sat' and '\n'; 'Then' is last, marks nothing
    assert (
        render_example(EX, r, 400, shift=True) == "The cat [[[sat]]] (act:0.5)[[[⏎]]] (act:1.5)Then"
    )


def test_xml_has_the_literal_window_and_the_annotated_copy() -> None:
    block = render_example(EX, ExampleRendering(format="xml", annotate=True), 400)
    root = ET.fromstring(block)
    assert root.tag == "example"
    assert root.findtext("raw") == "The cat sat\nThen"  # whitespace and newline kept
    assert (
        root.findtext("annotated")
        == "The [[[cat (act:0.5)]]] [[[sat (act:1.5)]]]\n[[[Then (act:2)]]]"
    )


def test_xml_survives_text_that_closes_cdata() -> None:
    ex = ActivationExample(
        tokens=("a]]>", "b"), activations=(1.0, 0.0), firings=(True, False), centre=0
    )
    root = ET.fromstring(render_example(ex, ExampleRendering(format="xml"), 400))
    assert root.findtext("raw") == "a]]>b"
    assert root.findtext("annotated") == "[[[a]]>]]]b"


def test_numbering_and_the_empty_case() -> None:
    two = render_examples([EX, EX], ExampleRendering(format="single_line"), 400)
    assert two.splitlines()[0].startswith("1. The [[[cat") and two.splitlines()[1].startswith("2. ")
    assert render_examples([], ExampleRendering(), 400) == "(no firing examples in the harvest)\n"
    xml = render_examples([EX, EX], ExampleRendering(format="xml"), 400)
    assert xml.count("<example>") == 2 and not xml.startswith("1.")


@pytest.mark.parametrize("fmt", ["delimited", "single_line", "xml"])
def test_every_rendering_is_explained_to_the_model(fmt: str) -> None:
    text = describe_rendering(ExampleRendering(format=fmt, annotate=True))  # type: ignore[arg-type]
    assert {"delimited": "<< and >>", "single_line": "[[[token]]] (act:X)", "xml": "<raw>"}[
        fmt
    ] in text


def test_all_strategies_are_registered_through_the_hook() -> None:
    assert set(BUILTINS) <= set(list_strategies())


@pytest.mark.parametrize("name", BUILTINS)
def test_the_shared_prefix_is_the_same_for_every_component(name: str) -> None:
    s = get_strategy(name)
    a, b = s.prompt(make_evidence(1)), s.prompt(make_evidence(2))
    assert a.system == b.system  # byte-identical: one cache entry serves the whole run
    assert METHOD_DESCRIPTION in a.system and METHOD_DESCRIPTION not in a.user
    assert "MARK1" in a.user and "MARK1" not in a.system
    assert "MLP input in block 3 of 4" in a.user  # the location is per component


def test_any_strategy_takes_a_rendering_option() -> None:
    s = get_strategy("compact_skeptical")
    p = s.prompt(make_evidence(5), s.options({"rendering": {"format": "xml"}}))
    assert "<raw><![CDATA[The cat MARK5 sat\n]]></raw>" in p.user
    assert "<raw>" in p.system  # and the model is told how to read it


def test_rich_examples_drops_input_statistics_and_annotates_examples() -> None:
    s = get_strategy("rich_examples")
    p = s.prompt(make_evidence(5))
    assert "' sat': 2.00" in p.user  # output PMI kept
    assert "' MARK5': 3.00" not in p.user and "' MARK5': 90%" not in p.user  # no input stats
    assert "' sat': 40%" not in p.user  # output precision is not shown either
    # default: single line, each firing token with its activation (factories: 1.0 + j, 0.5)
    assert "The cat [[[MARK5]]] (act:3) [[[sat]]] (act:0.5)⏎" in p.user
    assert "input side" in p.system.lower() and "output side" in p.system.lower()
    assert "at most 8 words" in p.system
    opts = s.options()
    assert opts.selection.n_top + opts.selection.n_quantiles * opts.selection.per_quantile == 30  # type: ignore[attr-defined]


def test_canon_shows_outputs_then_inputs_and_xml_examples() -> None:
    ev = make_evidence(5)
    p = get_strategy("canon").prompt(ev)
    assert p.user.index("Output tokens") < p.user.index("Input tokens") < p.user.index("<example>")
    assert "' MARK5': 50%" in p.user  # input recall
    assert "' MARK5': 3.00" in p.user and "' sat': 2.00" in p.user  # input and output PMI
    blocks = [b for b in p.user.split("\n") if b.startswith("<raw>")]
    assert len(blocks) == len(ev.examples)
    first = ET.fromstring(p.user[p.user.index("<example>") : p.user.index("</example>") + 10])
    assert first.findtext("annotated") == "The cat [[[MARK5 (act:3)]]] [[[sat (act:0.5)]]]\n"
    for fact in ("sign", "separator", "sequence boundaries", "do *not* fire on", "Lowercase"):
        assert fact in p.system, fact
    # the long shared part is what prompt caching pays for: it dwarfs this component's part
    assert len(p.system) > len(p.user)


def test_cli_options_override_only_what_is_given() -> None:
    from spd_host.cli.autointerp_cmd import _strategy_options

    none = {"n_top": None, "n_quantiles": None, "per_quantile": None}
    assert _strategy_options("rich_examples", none, {"format": None, "annotate": None}) == {}
    got = _strategy_options(
        "rich_examples", {**none, "n_top": 3}, {"format": "xml", "annotate": None}
    )
    # the strategy's own defaults (5 per stratum, annotated) survive beside the flags given
    assert got["selection"] == {"n_top": 3, "n_quantiles": 4, "per_quantile": 5, "seed": 0}
    assert got["rendering"] == {"format": "xml", "annotate": True, "delimiter": "brackets"}
    opts = get_strategy("rich_examples").options(got)
    assert opts.rendering.format == "xml"  # type: ignore[attr-defined]
