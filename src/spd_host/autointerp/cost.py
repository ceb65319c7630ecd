"""Cost estimates made before a call is sent.

No provider tokenizer is available offline, so prompt tokens are over-estimated as one token
per three UTF-8 bytes (real BPE tokenizers average about four bytes per token on English) plus
a fixed allowance for the schema and message framing; output is assumed to use all of
``max_output_tokens``. The estimate only gates sending; spend is computed from the usage the
provider reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from spd_host.autointerp.providers.base import Pricing

FRAMING_TOKENS = 64


def estimate_prompt_tokens(system: str, prompt: str, schema: Mapping[str, Any]) -> int:
    n_bytes = len(system.encode()) + len(prompt.encode()) + len(json.dumps(schema).encode())
    return math.ceil(n_bytes / 3) + FRAMING_TOKENS


def estimate_cost(pricing: Pricing, prompt_tokens: int, max_output_tokens: int) -> float:
    return pricing.cost(prompt_tokens, max_output_tokens)
