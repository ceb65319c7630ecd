"""Run by test_resume_after_sigkill in a subprocess: label N components against the server."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from factories import make_many

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.runner import label_components

if __name__ == "__main__":
    base_url, db_path, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    config = AutointerpConfig(
        provider="openai",
        model="gpt-4.1-mini",
        base_url=base_url,
        max_concurrent=8,
        backoff_base_s=0.01,
    )
    report = label_components(
        make_many(n), config, db_path=db_path, harvest_id="h1", decomposition_id="t:demo"
    )
    print(report.model_dump_json())
