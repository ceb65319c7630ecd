from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_server import LLMServer

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.runner import RunReport, label_components
from spd_host.autointerp.store import LabelRecord, LabelStore

MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}
# the batch tests': both batch providers, their pricing.yaml list prices (USD/MTok in, out;
# the batch price is half of both), and a batch run that polls fast
PROVIDERS = ["anthropic", "openai"]
LIST = {"anthropic": (1.00, 5.00), "openai": (0.40, 1.60)}
FAST = {"batch": True, "poll_interval_s": 0.05}


def run(
    server: LLMServer,
    provider: str,
    evidence: list[ComponentEvidence],
    db: Path,
    **overrides: Any,
) -> RunReport:
    opts: dict[str, Any] = {
        "provider": provider,
        "model": MODELS[provider],
        "base_url": server.anthropic_url if provider == "anthropic" else server.openai_url,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    opts.update(overrides)
    return label_components(
        evidence,
        AutointerpConfig(**opts),
        db_path=db,
        harvest_id="h1",
        decomposition_id="t:demo",
        seed=0,
    )


def rows(db: Path) -> list[LabelRecord]:
    with LabelStore(db) as store:
        return store.records()
