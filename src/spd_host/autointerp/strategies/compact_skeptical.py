"""``compact_skeptical``: a short detection label, with the model told to doubt weak evidence.

Shape after Goodfire's strategy of the same name (context, token statistics, delimited
examples, strict rules, "unclear" allowed), re-written for any method: the paragraph on what a
component is comes from the adapter's ``MethodInfo.description``. Everything that is the same
for every component of a run (role, method, how evidence is shown, task) is the system prompt,
the cacheable prefix; the user message holds only this component's evidence.
"""

from __future__ import annotations

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import select_examples
from spd_host.autointerp.strategies.base import Prompt, Strategy, StrategyOptions
from spd_host.autointerp.strategies.formatting import context_lines, token_list
from spd_host.autointerp.strategies.rendering import describe_rendering, render_examples

ROLE = (
    "You interpret components of decomposed language models from statistics and examples. "
    "You answer only through the requested JSON object."
)


def system_prompt(ev: ComponentEvidence, opts: StrategyOptions) -> str:
    """What every component of a run shares (the cacheable prefix): role, method, task."""
    forbidden = ", ".join(repr(w) for w in opts.forbidden_words) or "(none)"
    return f"""{ROLE}

## What a component is ({ev.method_name})
{ev.method_description}

## How the evidence is shown
Token statistics list the current tokens (recall, precision, PMI) and the predicted next tokens
(precision, PMI) most associated with the component firing. {describe_rendering(opts.rendering)}

## Task
Label what the component detects in at most {opts.label_max_words} words.
Be skeptical: name specific tokens or a tight grammatical or semantic pattern only when the
statistics and the examples agree; otherwise the label is "unclear".
- Prefer concrete labels ("plural -s suffix", "'of' after quantities") to abstract ones.
- Do not use these vague words: {forbidden}.
- Lowercase.
- confidence: "high" for a specific pattern supported by every source, "medium" for a
  plausible but noisy one, "low" for a guess.
"""


def build(ev: ComponentEvidence, opts: StrategyOptions) -> Prompt:
    n = opts.n_stat_tokens
    examples = select_examples(ev.examples, opts.selection, key=ev.component_key)
    inputs = "".join(
        [
            token_list(
                "Current tokens by recall (share of this component's firings on the token)",
                ev.input_tokens.recall,
                n,
                percent=True,
            ),
            token_list(
                "Current tokens by precision (how often the component fires when the token appears)",
                ev.input_tokens.precision,
                n,
                percent=True,
            ),
            token_list(
                "Current tokens by PMI (co-occur with firing more than chance; nats)",
                ev.input_tokens.pmi,
                n,
                percent=False,
            ),
        ]
    )
    outputs = "".join(
        [
            token_list(
                "Predicted next tokens by precision (share of the token's predicted probability at firing positions)",
                ev.output_tokens.precision,
                n,
                percent=True,
            ),
            token_list(
                "Predicted next tokens by PMI (predicted more than usual where it fires; nats)",
                ev.output_tokens.pmi,
                n,
                percent=False,
            ),
        ]
    )
    user = f"""Give a short label to this component.

## Context
{chr(10).join(context_lines(ev))}

## Token statistics
{inputs or "(no input-token statistics)"}
{outputs or "(no output-token statistics)"}
## Examples
{render_examples(examples, opts.rendering, opts.max_example_chars)}"""
    return Prompt(system=system_prompt(ev, opts), user=user)


STRATEGY = Strategy(
    name="compact_skeptical",
    description="short detection label; skeptical of weak evidence; 'unclear' allowed",
    build=build,
    options_model=StrategyOptions,
)
