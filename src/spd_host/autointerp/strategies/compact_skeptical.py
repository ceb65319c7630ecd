"""``compact_skeptical``: a short detection label, with the model told to doubt weak evidence.

Shape after Goodfire's strategy of the same name (context, token statistics, delimited
examples, strict rules, "unclear" allowed), re-written for any method: the paragraph on what a
component is comes from the adapter's ``MethodInfo.description``.
"""

from __future__ import annotations

from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.selection import select_examples
from spd_host.autointerp.strategies.base import Prompt, Strategy, StrategyOptions
from spd_host.autointerp.strategies.formatting import (
    context_lines,
    fires_on,
    numbered,
    token_list,
)

SYSTEM = (
    "You interpret components of decomposed language models from statistics and examples. "
    "You answer only through the requested JSON object."
)


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
    forbidden = ", ".join(repr(w) for w in opts.forbidden_words) or "(none)"
    user = f"""Give a short label to one component of a decomposed language model.

## What a component is ({ev.method_name})
{ev.method_description}

## Context
{chr(10).join(context_lines(ev))}

## Token statistics
{inputs or "(no input-token statistics)"}
{outputs or "(no output-token statistics)"}
## Examples (tokens where the component fires are between {"<<"} and {">>"})
{numbered(examples, fires_on, opts.max_example_chars)}
## Task
Label what this component detects in at most {opts.label_max_words} words.
Be skeptical: name specific tokens or a tight grammatical or semantic pattern only when the
statistics and the examples agree; otherwise the label is "unclear".
- Prefer concrete labels ("plural -s suffix", "'of' after quantities") to abstract ones.
- Do not use these vague words: {forbidden}.
- Lowercase.
- confidence: "high" for a specific pattern supported by every source, "medium" for a
  plausible but noisy one, "low" for a guess.
"""
    return Prompt(system=SYSTEM, user=user)


STRATEGY = Strategy(
    name="compact_skeptical",
    description="short detection label; skeptical of weak evidence; 'unclear' allowed",
    build=build,
    options_model=StrategyOptions,
)
