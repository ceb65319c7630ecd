"""Demo harvests (transcoder + SPD), offline labels and a detection eval, built once per session
through the real CLI; a live ``serve`` on a free loopback port; headless system Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spd_host.cli.app import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IDS = ["transcoder:demo", "spd:demo"]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``SPD_HOST_HOME`` holding both demo harvests, offline labels and an offline detection eval."""
    import torch

    from spd_host.plugins import reset_host

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("viewer_home")
    old = {k: os.environ.get(k) for k in ("SPD_HOST_HOME", "WANDB_MODE", "HF_HUB_OFFLINE")}
    os.environ.update(SPD_HOST_HOME=str(home), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    reset_host()
    try:
        _cli("harvest", "transcoder:demo", "--n-tokens", "4000")
        _cli("harvest", "spd:demo", "--n-tokens", "2000")
        _cli("autointerp", "transcoder:demo", "--provider", "offline", "--limit", "150")
        _cli("eval", "detection", "transcoder:demo", "--provider", "offline",
             "--n-components", "10", "--n-trials", "2")  # fmt: skip
        _cli("export", "logits", "transcoder:demo")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_host()
    return home


@pytest.fixture
def home(demo_home: Path, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point this test at the shared demo home (after the per-test isolation fixture)."""
    from spd_host.plugins import reset_host

    monkeypatch.setenv("SPD_HOST_HOME", str(demo_home))
    reset_host()
    return demo_home


@pytest.fixture(scope="session")
def viewer(demo_home: Path) -> Iterator[Any]:
    from spd_host.plugins import reset_host
    from spd_host.viewer.app import Viewer
    from spd_host.viewer.source import open_sources

    os.environ["SPD_HOST_HOME"] = str(demo_home)
    reset_host()
    v = Viewer(open_sources(IDS), background_tokens=False)
    yield v
    v.close()


@pytest.fixture(scope="session")
def server(viewer: Any) -> Iterator[str]:
    """``serve`` on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    from spd_host.viewer.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(viewer), host="127.0.0.1", port=port, log_level="warning")
    )
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium from the system packages (no browser download)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "system chromium/chromedriver not installed (scripts/dev.sh setup installs them as root: "
            "apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1800", "--allow-file-access-from-files"):  # fmt: skip
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
