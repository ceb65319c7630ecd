"""Cost estimates made before a call is sent.

No provider tokenizer is available offline, so the estimate is a worst case, not an average:
one token per UTF-8 byte of the prompt (byte-level BPE and byte-fallback tokenizers never
produce more tokens than bytes; English averages about four bytes per token, so this
over-reserves fourfold on purpose), plus a fixed allowance for the schema and message
framing; output is assumed to use all of ``max_output_tokens``. The estimate gates sending
(:class:`~spd_host.autointerp.limits.CostBudget`); spend is the usage the provider reports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spd_host.autointerp.providers.base import Pricing

FRAMING_TOKENS = 64


def estimate_prompt_tokens(system: str, prompt: str, schema: Mapping[str, Any]) -> int:
    n_bytes = len(system.encode()) + len(prompt.encode()) + len(json.dumps(schema).encode())
    return n_bytes + FRAMING_TOKENS


def estimate_cost(pricing: Pricing, prompt_tokens: int, max_output_tokens: int) -> float:
    return pricing.cost(prompt_tokens, max_output_tokens)
