""" "A new method is one pip install away": build the wheel, install it next to spd-host, use it, remove it.

Route (the fastest reliable one, no network, torch never re-installed):

1. copy the plugin's sources to a temp dir and ``pip wheel --no-deps --no-build-isolation --no-index``
   (setuptools and wheel come from the running environment);
2. ``python -m venv --without-pip`` a fresh environment, and give it the running environment's
   site-packages (torch, transformers, spd-host's dist-info and entry points) through one ``.pth``
   file, so nothing heavy is installed twice;
3. install the wheel with the running pip targeting the new interpreter (``pip --python``);
4. run ``python -m spd_host.cli.app`` in the new environment, with ``PYTHONPATH`` pointing at the
   spd-host sources this test imports (so a worktree's spd-host wins, as in the test process).

The tests below share one environment and run in file order: list, use, uninstall.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from molt_files import random_molt_tensors, write_molt, write_tiny_gpt2

import spd_host

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "venv" / "bin" / "python"
        self.home = root / "home"
        self.home.mkdir()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPD_HOST_LOAD_PLUGINS")
        }
        env.update(
            PYTHONPATH=str(Path(spd_host.__file__).resolve().parents[1]),
            SPD_HOST_HOME=str(self.home),
            HF_HUB_OFFLINE="1",
            WANDB_MODE="offline",
            COLUMNS="200",
        )
        proc = subprocess.run(
            [str(self.python), *args], env=env, capture_output=True, text=True, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "spd_host.cli.app", *args, check=check)

    def pip(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "pip", "--python", str(self.python), *args]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("molt_install")
    src = root / "src_copy"
    shutil.copytree(
        PLUGIN_ROOT,
        src,
        ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests"
        ),
    )
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("spd_host_molt-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    e = Env(root)
    site = e.run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "_shared_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    e.pip("install", "--no-deps", "--no-index", str(wheel))
    return e


def plugins_json(env: Env) -> dict:
    return json.loads(env.cli("plugins", "--json").stdout)


def test_installed_plugin_is_listed(env: Env) -> None:
    doc = plugins_json(env)
    assert "molt" in doc["methods"]
    (rec,) = [r for r in doc["plugins"] if r["name"] == "molt"]
    assert rec["distribution"] == "spd-host-molt" and rec["version"] == "0.1.0"
    assert not rec["first_party"] and rec["loaded"]
    assert {"register_methods", "load_decomposition", "harvest_fn"} <= set(rec["hooks"])
    # the plugin is imported from the installed wheel, not from the source tree
    where = env.run("-c", "import spd_host_molt; print(spd_host_molt.__file__)").stdout
    assert str(env.root / "venv") in where
    # and the opt-out switch hides it
    env_off = env.run(
        "-c",
        "import os; os.environ['SPD_HOST_LOAD_PLUGINS']='';"
        "from spd_host.plugins import get_host; print(get_host().method_names)",
    )
    assert "molt" not in env_off.stdout


def _cli_commands() -> set[str]:
    from spd_host.cli.app import app

    return {c.name for c in app.registered_commands if c.name} | {
        g.name for g in app.registered_groups if g.name
    }


def test_info_harvest_and_fidelity(env: Env, tmp_path: Path) -> None:
    from molt_files import CORPUS

    base = write_tiny_gpt2(tmp_path / "base", d_model=16, tokenizer=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    ranks = {1: 8, 4: 4}
    molt = write_molt(
        tmp_path / "molt",
        random_molt_tensors(16, ranks, seed=1),
        d_model=16,
        ranks=ranks,
        layer=1,
        lm={"model_name": "gpt2", "model_from_pretrained_path": str(base)},
    )
    if not _has_module("spd_host.topology"):
        pytest.skip(
            "spd_host.topology (branch topology) not merged yet: molt IDs cannot resolve hook points"
        )
    info = json.loads(env.cli("info", f"molt:{molt}", "--json").stdout)
    assert info["method"]["name"] == "molt" and info["n_components"] == 12
    missing = [c for c in ("harvest", "eval") if c not in _cli_commands()]
    missing += [m for m in ("spd_host.models", "spd_host.data") if not _has_module(m)]
    if missing:
        pytest.skip(f"{missing} (branches harvest / evals / demo) not merged yet")
    small = ["--dataset", str(corpus), "--n-tokens", "256", "--batch-size", "4", "--seq-len", "32"]
    harvest = env.cli("harvest", f"molt:{molt}", *small, "--json")
    doc = json.loads(harvest.stdout)
    assert doc["n_tokens"] >= 256
    (site,) = doc["sites"]
    assert site["components"] == 12
    fidelity = json.loads(env.cli("eval", "fidelity", f"molt:{molt}", *small, "--json").stdout)
    assert fidelity["failures"] == []
    assert "1.mlp_out" in json.dumps(fidelity)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_uninstall_removes_it(env: Env) -> None:
    env.pip("uninstall", "-y", "spd-host-molt")
    doc = plugins_json(env)
    assert "molt" not in doc["methods"]
    assert all(r["name"] != "molt" for r in doc["plugins"])
    bad = env.cli("info", "molt:/nowhere", check=False)
    assert bad.returncode == 2 and "unknown method 'molt'" in bad.stderr
