#!/usr/bin/env bash
# One entry point for people and CI:
#   bash scripts/dev.sh demo   install everything (first run) and run the pipeline on the bundled demo
#   bash scripts/dev.sh test   install everything (first run) and run the test suite
#   bash scripts/dev.sh check  ruff (lint + format) and mypy
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPD_HOST_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import spd_host, torch, pytest, xdist, starlette, uvicorn, selenium, orbax.checkpoint, google.genai" >/dev/null 2>&1; then
    "$PY" -m pip install -q --upgrade pip
    # torch first, pinned: 2.13.0 is the CPU build; a looser spec can pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e ".[dev]"
  fi
  browser
}

# The viewer's browser tests drive the system Chromium (Debian packages; never a downloaded
# browser build). Installed when missing and we are root; otherwise those tests skip and say why.
browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "warning: could not install chromium; the viewer's browser tests will be skipped" >&2
  else
    echo "note: chromium + chromedriver not found (install: apt-get install chromium chromium-driver);" \
      "the viewer's browser tests will be skipped" >&2
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; "$VENV/bin/spd-host" demo "$@" ;;
  test)
    setup
    # Separately installable plugin distributions test from their own source trees, not installed.
    for plugin in plugins/*/; do
      (cd "$plugin" && PYTHONPATH="$PWD/src" "../../$PY" -m pytest -q -p no:cacheprovider tests)
    done
    # two worker processes (pytest-xdist): the suite is mostly single-threaded waits on
    # subprocesses, servers and a browser, so it uses both cores of a 2-core machine
    "$PY" -m pytest -q -p no:cacheprovider -n "${SPD_HOST_TEST_WORKERS:-2}" "$@"
    ;;
  check)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    ;;
  *) echo "usage: $0 {demo|test|check|setup}" >&2; exit 2 ;;
esac
