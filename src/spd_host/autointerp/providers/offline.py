"""The offline baseline explainer: a deterministic label from token PMI, no network, no key.

It exists so the pipeline runs end to end anywhere (CI, the README demo) and as a floor that
LLM labels should beat in the label-scoring evals. Every label it writes starts with
``"baseline: "``, its model name is :data:`BASELINE_MODEL`, and the store marks its rows
``is_baseline``, so it can never be mistaken for an LLM's interpretation.

Rule: the top ``N_TOKENS`` input tokens by PMI (what the component reads) and the top output
tokens by PMI (what the model predicts next where it fires), ties broken by token string.
Confidence is ``low`` always: PMI alone is weak evidence.
"""

from __future__ import annotations

import json

from spd_host.autointerp.answer import LabelAnswer
from spd_host.autointerp.evidence import TokenValue
from spd_host.autointerp.providers.base import (
    ClientOptions,
    Completion,
    CompletionRequest,
    Pricing,
    Provider,
)

BASELINE_MODEL = "pmi-baseline-v1"
BASELINE_PREFIX = "baseline: "
N_TOKENS = 3


def _top(values: tuple[TokenValue, ...], n: int) -> list[str]:
    ordered = sorted(values, key=lambda tv: (-tv.value, tv.token))
    return [repr(tv.token) for tv in ordered[:n]]


def baseline_answer(request: CompletionRequest) -> LabelAnswer:
    ev = request.evidence
    reads = _top(ev.input_tokens.pmi, N_TOKENS)
    says = _top(ev.output_tokens.pmi, N_TOKENS)
    parts = []
    if reads:
        parts.append("reads " + "/".join(reads))
    if says:
        parts.append("predicts " + "/".join(says))
    label = BASELINE_PREFIX + ("; ".join(parts) if parts else "no token evidence")
    reasoning = (
        "Offline PMI baseline, not an LLM interpretation: the label lists the input tokens with "
        f"the highest PMI with firing ({', '.join(reads) or 'none'}) and the predicted next "
        f"tokens with the highest PMI ({', '.join(says) or 'none'}); firing density "
        f"{ev.firing_density:.4%}."
    )
    return LabelAnswer(label=label, confidence="low", reasoning=reasoning)


class OfflineBaselineClient:
    def __init__(self, options: ClientOptions) -> None:
        self.model = options.model

    async def complete(self, request: CompletionRequest) -> Completion:
        answer = baseline_answer(request)
        raw = json.dumps(answer.model_dump(), sort_keys=True)
        return Completion(answer=answer, raw=raw, input_tokens=0, output_tokens=0)

    async def aclose(self) -> None:
        return None


PROVIDER = Provider(
    name="offline",
    description="BASELINE (no LLM): deterministic label from the top input/output PMI tokens",
    make_client=OfflineBaselineClient,
    default_model=BASELINE_MODEL,
    api_key_env=None,
    key_required=False,
    default_pricing=Pricing(input_per_mtok=0.0, output_per_mtok=0.0),
    baseline=True,
)
