"""Run inside a private user + mount namespace (``unshare -rm``) by ``test_disk_full.py``.

A tmpfs is mounted and filled with a ballast file (``posix_fallocate``) so that only a few
bytes stay free: the kernel itself then answers ENOSPC to every writer (Python's io,
safetensors' Rust writer, SQLite), exactly as on a full disk. The CLI runs as a user runs
it (a fresh process per command); the ballast is then deleted ("free space") and the same
command is run again. A reference run on the ordinary disk gives what the result must be.
Everything observed is written as JSON to ``<work>/report.json`` for the test to assert.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

WORK = Path(sys.argv[1])
MNT = WORK / "mnt"
HARVEST = [
    "harvest", "transcoder:demo", "--n-tokens", "512", "--batch-size", "2", "--seq-len", "64",
    "--checkpoint-every", "1", "--examples-per-component", "3", "--context-tokens", "2",
    "--json",
]  # fmt: skip
AUTOINTERP = ["autointerp", "transcoder:demo", "--provider", "offline", "--no-progress"]
AUTOINTERP += ["--limit", "30", "--json"]


def cli(args: list[str], home: Path) -> dict[str, Any]:
    env = {**os.environ, "SPD_HOST_HOME": str(home), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "spd_host.cli.app", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def fill(leave: int) -> None:
    """Leave only ``leave`` bytes free on the tmpfs."""
    ballast = MNT / "ballast"
    ballast.unlink(missing_ok=True)
    free = shutil.disk_usage(MNT).free
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(free - leave, 0))
    finally:
        os.close(fd)


def free_space() -> None:
    (MNT / "ballast").unlink()


def labels(home: Path) -> list[list[str]]:
    (db,) = home.rglob("labels.db")
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT component_key, status, label FROM labels ORDER BY component_key"
        ).fetchall()
    finally:
        con.close()
    return [list(r) for r in rows]


def state_of(run: Path) -> dict[str, Any] | None:
    state = run / "state" / "state.json"
    if not state.exists():
        return None
    meta = json.loads(state.read_text())
    tensors = run / "state" / meta["tensors"]
    return {
        "next_local_batch": meta.get("next_local_batch"),
        "tensors_exist": tensors.exists(),
        "stray_tmp": sorted(p.name for p in (run / "state").glob(".*tmp*")),
    }


def first_checkpoint_bytes(out: Path) -> int:
    """The size of the harvest's first checkpoint (one batch, through the API's stop_after),
    so the ballast leaves room for it and not for the next one, whatever the state layout."""
    from spd_host.harvest import HarvestConfig, run_harvest

    args = dict(zip(HARVEST[2:-1:2], HARVEST[3:-1:2], strict=True))
    config = HarvestConfig(**{k.lstrip("-").replace("-", "_"): int(v) for k, v in args.items()})
    run_harvest("transcoder:demo", config, out=out, stop_after=1, progress=False)
    size = sum(p.stat().st_size for p in (out / "state").iterdir())
    shutil.rmtree(out)
    return size


def main() -> None:
    MNT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(MNT)], check=True)
    report: dict[str, Any] = {}
    ref_home = WORK / "home_ref"

    # --- harvest: reference, then a full disk, then space freed and the same command again
    report["harvest_ref"] = cli(HARVEST, ref_home)
    os.environ["SPD_HOST_HOME"] = str(ref_home)
    first = first_checkpoint_bytes(MNT / "calibrate")
    report["first_checkpoint_bytes"] = first
    run = MNT / "run"
    fill(leave=first + first // 2)  # the first checkpoint fits, the second does not
    report["harvest_full"] = cli([*HARVEST, "--out", str(run)], ref_home)
    report["harvest_state_after_full"] = state_of(run)
    free_space()
    report["harvest_resumed"] = cli([*HARVEST, "--out", str(run)], ref_home)
    (ref_run,) = (ref_home / "results").glob("*/harvest/run-*")
    report["harvest_files_equal"] = {
        name: (ref_run / name).read_bytes() == (run / name).read_bytes()
        for name in ("stats.safetensors", "examples.safetensors")
    }

    # --- autointerp: labels.db on a full disk, then space freed and the same command again
    # --limit is per run: the resumed run labels 30 more, so the reference labels 60
    report["autointerp_ref"] = cli([*AUTOINTERP[:-3], "--limit", "60", "--json"], ref_home)
    report["labels_ref"] = labels(ref_home)
    (db,) = ref_home.rglob("labels.db")
    db_bytes = sum(p.stat().st_size for p in db.parent.glob("labels.db*"))
    home = MNT / "home"
    shutil.copytree(
        ref_home / "results",
        home / "results",
        ignore=shutil.ignore_patterns("labels.db*", "autointerp"),
    )
    # room for some of the labels, not all (a WAL commit appends whole 4 KiB pages)
    fill(leave=db_bytes)
    report["autointerp_full"] = cli(AUTOINTERP, home)
    report["labels_after_full"] = labels(home)
    free_space()
    report["autointerp_resumed"] = cli(AUTOINTERP, home)
    report["labels_resumed"] = labels(home)
    (WORK / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
