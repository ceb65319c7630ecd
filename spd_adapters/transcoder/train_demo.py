"""Train and save the ``transcoder:demo`` decomposition: ``python -m spd_adapters.transcoder.train_demo [OUT [MODEL]]``.

Seeded and CPU-friendly (about a minute); writes circuit-tracer's layout plus
``demo_metrics.json`` (mean L0, held-out CE clean / spliced / zero-ablated) into
``spd_adapters/transcoder/demo_assets/`` unless another directory is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spd_adapters._demo_training import STEPS, main

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "demo_assets"
    main(
        "transcoder",
        out,
        sys.argv[2] if len(sys.argv) > 2 else "demo",
        int(sys.argv[3]) if len(sys.argv) > 3 else STEPS,
    )
