"""Run by test_batch_resume in a subprocess: label N components through a batch API, then print
the report; the test SIGKILLs it while its batch is being created or is running. With a fifth
argument ``cancel`` it cancels the store's open batches instead (test_batch_control kills it
mid-cancel)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from factories import make_many

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.runner import label_components

MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}

if __name__ == "__main__":
    provider, base_url, db_path, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    config = AutointerpConfig(
        provider=provider,
        model=MODELS[provider],
        base_url=base_url,
        batch=True,
        poll_interval_s=0.05,
        backoff_base_s=0.01,
        cancel_batches=sys.argv[5:] == ["cancel"],
    )
    report = label_components(
        make_many(n), config, db_path=db_path, harvest_id="h1", decomposition_id="t:demo"
    )
    print(report.model_dump_json())
