"""Evidence built in tests (no harvest needed). ``MARK<n>`` in a token lets the local server
tell which component a request is about."""

from __future__ import annotations

from spd_host.autointerp.evidence import (
    ActivationExample,
    ComponentEvidence,
    TokenStatLists,
    TokenValue,
)

METHOD_DESCRIPTION = "A test method: each component is a direction; it fires above zero."


def make_evidence(i: int, *, n_examples: int = 3) -> ComponentEvidence:
    examples = tuple(
        ActivationExample(
            tokens=("The", " cat", f" MARK{i}", " sat", "\n"),
            activations=(0.0, 0.1, 1.0 + j, 0.5, 0.0),
            firings=(False, False, True, True, False),
            centre=2,
        )
        for j in range(n_examples)
    )
    return ComponentEvidence(
        component_key=f"3.mlp_in:{i}",
        site="3.mlp_in",
        location="3.mlp_in",
        location_description="MLP input in block 3 of 4",
        method_name="testmethod",
        method_description=METHOD_DESCRIPTION,
        firing_density=0.01,
        firing_count=100,
        input_tokens=TokenStatLists(
            pmi=(TokenValue(token=f" MARK{i}", value=3.0), TokenValue(token=" cat", value=1.0)),
            precision=(TokenValue(token=f" MARK{i}", value=0.9),),
            recall=(TokenValue(token=f" MARK{i}", value=0.5),),
        ),
        output_tokens=TokenStatLists(
            pmi=(TokenValue(token=" sat", value=2.0), TokenValue(token=" on", value=2.0)),
            precision=(TokenValue(token=" sat", value=0.4),),
        ),
        examples=examples,
        dataset="tiny test corpus",
        model_name="demo",
    )


def make_many(n: int) -> list[ComponentEvidence]:
    return [make_evidence(i, n_examples=1) for i in range(n)]
