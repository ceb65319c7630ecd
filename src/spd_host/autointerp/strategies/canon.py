"""``canon``: the long-form prompt, every piece of evidence, examples as raw + annotated XML.

The facts of Goodfire's strategy of this name, in our own words and for any method: a full
explanation of the decomposition method up front; guidance on reading activation values (how
strongly the component responds, and that a split by sign within one component can mark two
distinct roles even where the overall sign is arbitrary); what "firing" means; the component's
place in the model and its firing rate; output- then input-token statistics (recall and PMI);
examples as XML blocks with the literal window and an annotated copy carrying each firing
token's activation; a note that windows are cut at sequence boundaries and that documents are
concatenated; and a task asking for the most distinctive aspect of the component's behaviour
(its inputs, its outputs, its contexts, or what it does *not* fire on), with a short summary
of the reasoning and honest uncertainty.

Goodfire's version is written for SPD's causal importance; here the method paragraph is the
adapter's ``MethodInfo.description`` and the activation shown is the method's primary one.
Its long shared part makes it the strategy that gains most from prompt caching: everything
but the component's own evidence is the system prompt.
"""

from __future__ import annotations

from pydantic import Field

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import ExampleSelection, select_examples
from spd_host.autointerp.strategies.base import Prompt, Strategy, StrategyOptions
from spd_host.autointerp.strategies.formatting import context_lines, density_note, token_list
from spd_host.autointerp.strategies.rendering import (
    ExampleRendering,
    describe_rendering,
    render_examples,
)


class CanonOptions(StrategyOptions):
    selection: ExampleSelection = ExampleSelection(n_top=10, n_quantiles=4, per_quantile=5)
    label_max_words: int = Field(default=8, ge=2)
    rendering: ExampleRendering = ExampleRendering(format="xml", annotate=True)


def system_prompt(ev: ComponentEvidence, opts: CanonOptions) -> str:
    """The shared, cacheable part of every prompt of a run."""
    return f"""### Context
You will be shown data about one component of a neural network, isolated by a mechanistic
interpretability method, and asked to describe what the component does from that evidence
alone. You answer only through the requested JSON object.

### The method: {ev.method_name}
{ev.method_description}

### Reading activations
At every token position the component has an activation value; it "fires" where the method's
firing criterion holds (above its threshold). Large values mark the positions where the
component matters most: weigh strongly firing examples heavily and treat barely firing ones
as weak evidence. Some methods give activations of both signs, and for some of them the
overall sign is a convention (flipping both of a component's directions changes nothing).
Even then, the sign *within* one component means something: positions of opposite sign push
the output in opposite directions. If the examples split into a positive and a negative group,
that split is likely two distinct roles; describe both, without reading meaning into which
one is positive.

### Evidence shown
- Output tokens: at the positions where the component fires, the tokens the model predicts
  next. Recall: the share of the model's next-token probability at those positions that goes to
  each token. PMI: the same normalised by how often the token is predicted anyway (nats: 0 no
  association, 1 about 3x, 2 about 7x, 3 about 20x).
- Input tokens: the tokens at the positions where it fires, by recall (the share of its
  firings on each token) and PMI.
- Activating examples, sampled from the positions where the component fires: the strongest
  first, then firings drawn across the range of strengths. Each is a window centred on one
  firing, with context on both sides; windows are cut at sequence boundaries, so a firing
  with little left context may sit at the start of a sequence, which is itself evidence.
  Training text is documents joined with separator tokens and cut into fixed-length
  sequences, so a separator can appear anywhere, and one window can span two documents; a
  separator in an example is a real token the model saw. Every firing position in a window
  is annotated, not only the one that was sampled.
- {describe_rendering(opts.rendering)}

### Task
From all of the above, give a label of at most {opts.label_max_words} words for this
component: the most salient aspect of its behaviour. Components are described best in
different ways: some by the inputs they respond to, some by the outputs they promote, some by
the contexts they appear in, some by what they do *not* fire on. Lead with whatever is most
distinctive for this one. In the reasoning, summarise the evidence briefly. Be honest about
uncertainty when the evidence is weak, ambiguous or mixed (confidence "low"). Lowercase only.
"""


def build(ev: ComponentEvidence, opts: CanonOptions) -> Prompt:
    n = opts.n_stat_tokens
    examples = select_examples(ev.examples, opts.selection, key=ev.component_key)
    outputs = "".join(
        [
            token_list("Output recall", ev.output_tokens.recall, n, percent=True),
            token_list("Output PMI (nats)", ev.output_tokens.pmi, n, percent=False),
        ]
    )
    inputs = "".join(
        [
            token_list("Input recall", ev.input_tokens.recall, n, percent=True),
            token_list("Input PMI (nats)", ev.input_tokens.pmi, n, percent=False),
        ]
    )
    note = density_note(ev.firing_density)
    user = f"""### This component
{chr(10).join(context_lines(ev))}
{note}
### Output tokens (what the model produces where this component fires)
{outputs or "(no output-token statistics)"}
### Input tokens (the tokens it fires on)
{inputs or "(no input-token statistics)"}
### Activating examples
{render_examples(examples, opts.rendering, opts.max_example_chars)}"""
    return Prompt(system=system_prompt(ev, opts), user=user)


STRATEGY = Strategy(
    name="canon",
    description="long-form: full method explanation, output+input statistics, raw+annotated XML examples",
    build=build,
    options_model=CanonOptions,
)
