"""A full disk is a one-line error that loses nothing already computed, and the same command
run again after freeing space completes to the result a run on an ample disk gives.

How the disk is made full, and why it is faithful: a real tmpfs, mounted in a private user
and mount namespace (``unshare -rm``, no privileges needed where unprivileged user
namespaces are allowed), filled by a ballast file so that a few bytes stay free. The kernel
then answers ENOSPC to every writer exactly as on a full disk: Python's io, safetensors'
Rust writer (which raises ``SafetensorError``, not ``OSError``), SQLite (``database or disk
is full``), at whatever write it happens to reach first. ``RLIMIT_FSIZE`` would give EFBIG
(a different error, per file); ``/dev/full`` cannot stand in for files written under a
temporary name and renamed; patching ``os.write`` would miss the Rust and SQLite writers.
The CLI runs in fresh processes, as a user runs it; the scenario is in
``disk_full_driver.py``. Where namespaces are not allowed the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
         "mount -t tmpfs -o size=64k tmpfs /tmp"],
        capture_output=True,
        check=False,
    )  # fmt: skip
    return probe.returncode == 0


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.slow
@pytest.mark.skipif(not _namespaces_allowed(), reason="no unprivileged user+mount namespaces")
def test_full_disk_during_harvest_and_autointerp(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, str(Path(__file__).with_name("disk_full_driver.py")),
         str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())

    # harvest: the write that did not fit is one line, exit 1
    assert r["harvest_ref"]["rc"] == 0, r["harvest_ref"]["stderr"]
    assert r["harvest_full"]["rc"] == 1
    line = _one_error_line(r["harvest_full"]["stderr"])
    assert line.startswith("error: the disk is full"), line
    assert "checkpoints are kept" in r["harvest_full"]["stderr"]
    # ...what was computed before it is kept: the first checkpoint, whole, and no partial file
    state = r["harvest_state_after_full"]
    assert state == {"next_local_batch": 1, "tensors_exist": True, "stray_tmp": []}, state
    # ...and after freeing space the same command finishes to the ample-disk result, bit for bit
    assert r["harvest_resumed"]["rc"] == 0, r["harvest_resumed"]["stderr"]
    assert r["harvest_files_equal"] == {"stats.safetensors": True, "examples.safetensors": True}
    ref, resumed = (
        json.loads(r["harvest_ref"]["stdout"]),
        json.loads(r["harvest_resumed"]["stdout"]),
    )
    assert resumed["sites"] == ref["sites"] and resumed["n_tokens"] == ref["n_tokens"]

    # autointerp: labels.db on the full disk
    assert r["autointerp_ref"]["rc"] == 0, r["autointerp_ref"]["stderr"]
    assert r["autointerp_full"]["rc"] == 1
    line = _one_error_line(r["autointerp_full"]["stderr"])
    assert line.startswith("error: the disk is full"), line
    ref_labels = r["labels_ref"]  # 60 labels made on an ample disk
    kept = r["labels_after_full"]  # what the full-disk run (--limit 30) stored before it stopped
    assert len(ref_labels) == 60 and 0 < len(kept) < 30
    assert all(row in ref_labels for row in kept)  # what was stored is whole and right
    # freed and re-run: continues where it stopped (30 more), nothing twice, the same labels
    assert r["autointerp_resumed"]["rc"] == 0, r["autointerp_resumed"]["stderr"]
    resumed = r["labels_resumed"]
    assert len(resumed) == len(kept) + 30 and len({row[0] for row in resumed}) == len(resumed)
    assert all(row in resumed for row in kept) and all(row in ref_labels for row in resumed)
