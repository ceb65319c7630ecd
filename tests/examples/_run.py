"""Run an example script the way a user would: a fresh interpreter, our checkout first on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SPD_HOST_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        # one torch thread: on a shared, loaded machine two threads per tiny matmul made the
        # examples 3x slower (measured), and the examples' sizes gain nothing from threads
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
