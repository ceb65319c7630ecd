"""``dual_view``: a functional label from both what the component reads and what follows.

Shape after Goodfire's strategy of the same name: output evidence first, then input evidence,
then the same examples twice — once with the firing tokens delimited (what it reads) and once
with the delimiters moved one token right (what the model produces next) — and a task that asks
for the component's job rather than its trigger. The shared part (role, method, how evidence
is shown, task) is the system prompt, the cacheable prefix.
"""

from __future__ import annotations

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import select_examples
from spd_host.autointerp.strategies.base import Prompt, Strategy, StrategyOptions
from spd_host.autointerp.strategies.formatting import context_lines, density_note, token_list
from spd_host.autointerp.strategies.rendering import describe_rendering, render_examples

ROLE = (
    "You describe the function of components of decomposed language models from evidence about "
    "what they read and what the model produces. You answer only through the requested JSON object."
)


def system_prompt(ev: ComponentEvidence, opts: StrategyOptions) -> str:
    """What every component of a run shares (the cacheable prefix): role, method, task."""
    forbidden = ", ".join(repr(w) for w in opts.forbidden_words)
    return f"""{ROLE}

## What a component is ({ev.method_name})
{ev.method_description}

A component's input side (what makes it fire) and output side (what the model goes on to
produce) often differ: it may fire on an opening quote and lead to a name, or fire on a verb
and lead to its object. Weigh both, and trust patterns that several sources agree on: token
statistics are noisy and the examples are a sample.

## How the evidence is shown
Output-side statistics first (what the model predicts next where the component fires), then
input-side statistics (the tokens it fires on), then the examples twice: once marking where it
fires, once with the marks moved one token right, onto what came next.
{describe_rendering(opts.rendering)}

## Task
In at most {opts.label_max_words} words, say what job this component does, using both sides
(for example "opens dialogue after said", "plural endings on nouns", "closing bracket of lists").
Answer "unclear" when the evidence is weak or scattered.{f" Avoid: {forbidden}." if forbidden else ""}
Lowercase. confidence: "high" only when input and output evidence tell one consistent story.
"""


def build(ev: ComponentEvidence, opts: StrategyOptions) -> Prompt:
    n = opts.n_stat_tokens
    examples = select_examples(ev.examples, opts.selection, key=ev.component_key)
    outputs = "".join(
        [
            token_list("Next tokens by PMI (nats)", ev.output_tokens.pmi, n, percent=False),
            token_list("Next tokens by precision", ev.output_tokens.precision, n, percent=True),
            token_list("Next tokens by recall", ev.output_tokens.recall, n, percent=True),
        ]
    )
    inputs = "".join(
        [
            token_list("Current tokens by PMI (nats)", ev.input_tokens.pmi, n, percent=False),
            token_list("Current tokens by precision", ev.input_tokens.precision, n, percent=True),
            token_list("Current tokens by recall", ev.input_tokens.recall, n, percent=True),
        ]
    )
    note = density_note(ev.firing_density)
    user = f"""Describe what this component does.

## Context
{chr(10).join(context_lines(ev))}
{note}
## Output side: what the model predicts next where it fires
{outputs or "(no output-token statistics)"}
## Input side: what it fires on
{inputs or "(no input-token statistics)"}
## Examples: where it fires
{render_examples(examples, opts.rendering, opts.max_example_chars)}
## The same examples: what comes next (the token after each firing position marked)
{render_examples(examples, opts.rendering, opts.max_example_chars, shift=True)}"""
    return Prompt(system=system_prompt(ev, opts), user=user)


STRATEGY = Strategy(
    name="dual_view",
    description="functional label from what the component reads and what the model produces next",
    build=build,
    options_model=StrategyOptions,
)
