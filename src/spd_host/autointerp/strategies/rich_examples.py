"""``rich_examples``: a functional label from many annotated examples and the output side only.

The facts of Goodfire's strategy of this name, in our own words and for any method: no
input-token statistics at all; each firing token in the examples carries its activation
inline, so the model can weigh strong against marginal firings itself; the output side (next
tokens predicted more than usual where it fires, by PMI) is the one statistic kept; more
examples than the other strategies (30 by default); the task asks for the component's job
(what makes it fire and what the model then produces), hedged when the evidence is mixed.
Default rendering: one line per example with the activation after each firing token; ``xml``
works too (``rendering.format``).

Everything shared by a run's components (role, method, how the data were sampled, how the
examples are annotated, the task) is the system prompt, the cacheable prefix.
"""

from __future__ import annotations

from pydantic import Field

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import ExampleSelection, select_examples
from spd_host.autointerp.strategies.base import Prompt, Strategy, StrategyOptions
from spd_host.autointerp.strategies.formatting import context_lines, token_list
from spd_host.autointerp.strategies.rendering import (
    ExampleRendering,
    describe_rendering,
    render_examples,
)


class RichExamplesOptions(StrategyOptions):
    selection: ExampleSelection = ExampleSelection(n_top=10, n_quantiles=4, per_quantile=5)
    label_max_words: int = Field(default=8, ge=2)
    n_stat_tokens: int = Field(default=10, ge=0, description="output PMI tokens shown")
    rendering: ExampleRendering = ExampleRendering(format="single_line", annotate=True)


ROLE = (
    "You work out what components of decomposed language models do, mainly from annotated "
    "examples of where they fire. You answer only through the requested JSON object."
)


def system_prompt(ev: ComponentEvidence, opts: RichExamplesOptions) -> str:
    """The shared, cacheable part of every prompt of a run."""
    return f"""{ROLE}

## The decomposition ({ev.method_name})
{ev.method_description}

## What a component does
A component has two sides that often differ. Its input side is what makes it fire: a token,
a spelling, a grammatical slot, a topic. Its output side is what the model goes on to produce
where it fires. A component may fire on full stops yet lead to words that open sentences, or
fire on prepositions yet lead to abstract nouns. Describe the job the two sides do together.

## The data
Each example is a window of text around one position where the component fired, sampled from
the harvest: the strongest firings first, then firings drawn across the range of strengths.
The sample may not represent everything the component does. Firing tokens near the edge of a
window may mean the pattern depends on where a sequence or document begins.
{describe_rendering(opts.rendering)} A firing with a small activation is weaker evidence than
one with a large activation; if the examples split into groups by the size or the sign of the
activation, the groups may be separate patterns worth naming.

The only statistic shown is on the output side: next tokens the model predicts more often
than usual at the positions where the component fires, by pointwise mutual information (PMI,
in nats: 0 none, 1 about 3x, 2 about 7x, 3 about 20x).

## Task
In at most {opts.label_max_words} words, label the job this component does, using both the
examples and the output evidence. Patterns repeated across many examples count; one-off
coincidences do not. Be honest about uncertainty: when the evidence is weak, ambiguous or
mixed, say so in the label (or answer "unclear") and give confidence "low". Lowercase only.
"""


def build(ev: ComponentEvidence, opts: RichExamplesOptions) -> Prompt:
    examples = select_examples(ev.examples, opts.selection, key=ev.component_key)
    output_pmi = token_list(
        "Output PMI (next tokens predicted more than usual where it fires; nats)",
        ev.output_tokens.pmi,
        opts.n_stat_tokens,
        percent=False,
    )
    user = f"""Label this component.

## Context
{chr(10).join(context_lines(ev))}

## Output evidence
{output_pmi or "(no output-token statistics)"}
## Examples: where the component fires
{render_examples(examples, opts.rendering, opts.max_example_chars)}"""
    return Prompt(system=system_prompt(ev, opts), user=user)


STRATEGY = Strategy(
    name="rich_examples",
    description="functional label from many activation-annotated examples and output PMI; no input statistics",
    build=build,
    options_model=RichExamplesOptions,
)
