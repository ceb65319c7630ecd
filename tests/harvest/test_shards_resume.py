"""Sharding (in-process and under torchrun), merge exactness, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo, merge_shards
from tests.harvest.compare import assert_same_results
from tests.harvest.conftest import harvest_toy, toy_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "harvest" / "run_toy.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=_env(), timeout=300
    )
    return out


def test_in_process_shards_merge_to_single_result(
    toy_host: object, tmp_path: Path, single: Path
) -> None:
    cfg = toy_config(cooccurrence_fraction=0.5)  # as in run_toy.py
    out = tmp_path / "sharded"
    for rank in range(3):
        repo = harvest_toy(out, cfg, rank=rank, world_size=3) if rank == 2 else None
        if rank < 2:
            from spd_host.harvest import run_harvest
            from tests.harvest import toy_plugin

            assert (
                run_harvest(
                    "toy:demo",
                    cfg,
                    out=out,
                    rank=rank,
                    world_size=3,
                    batches=toy_plugin.toy_source(cfg.batch_size, 12),
                    progress=False,
                )
                is None
            )
    assert repo is not None  # the last rank to finish merged
    assert repo.meta["world_size"] == 3
    assert_same_results(single, out, reservoir=False)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_torchrun_two_processes_equal_single_process(tmp_path: Path, single: Path) -> None:
    out = tmp_path / "torchrun"
    subprocess.run(
        [
            str(TORCHRUN),
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            str(SCRIPT),
            "--out",
            str(out),
        ],
        check=True,
        env=_env(),
        timeout=300,
        capture_output=True,
    )
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    assert (out / "harvest.json").exists()  # merged by the rank that finished last
    assert_same_results(single, out, reservoir=False)
    # the explicit merge command gives the same (counts exact; reservoir re-drawn identically: same seed)
    (out / "harvest.json").unlink()
    result = CliRunner().invoke(app, ["harvest", "merge", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["n_tokens"] == 2400 and doc["world_size"] == 2
    assert {s["site"] for s in doc["sites"]} == {"0.mlp", "1.mlp"}
    assert_same_results(single, out, reservoir=False)


def test_sigkill_then_rerun_resumes_to_identical_statistics(tmp_path: Path, single: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(TOY_SLEEP="0.05"))
    state = out / "state" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["next_local_batch"] >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = json.loads(state.read_text())["next_local_batch"]
    assert 10 <= done_before < 50, "the kill should land mid-run"
    assert not (out / "harvest.json").exists()
    subprocess.run(cmd, check=True, env=_env(), timeout=300)
    assert HarvestRepo(out).n_tokens == 2400
    # identical, reservoir included: per-batch RNG is a function of (seed, batch index)
    assert_same_results(single, out, reservoir=True)


def test_merge_without_shards_is_a_clear_error(tmp_path: Path) -> None:
    from spd_host.errors import ResultsNotFoundError

    with pytest.raises(ResultsNotFoundError, match="no shard states"):
        merge_shards(tmp_path)


def test_cli_harvest_unknown_method_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["harvest", "nosuchmethod:demo", "--n-tokens", "10"])
    assert result.exit_code == 2
    assert "unknown method" in result.output


def test_cli_merge_needs_an_id_or_out() -> None:
    result = CliRunner().invoke(app, ["harvest", "merge"])
    assert result.exit_code == 1
    assert "--out" in result.output
