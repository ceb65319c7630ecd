"""Jinja2 rendering shared by the server and the static export; links differ, pages do not."""

from __future__ import annotations

import math
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import jinja2

from spd_host.viewer.index import DENSITY_BINS

STATIC_DIR = Path(str(files("spd_host.viewer") / "static"))
INDEX_COLUMNS = [
    ("key", "component"),
    ("site", "site"),
    ("density", "density"),
    ("mean", "mean act"),
    ("max", "max act"),
    ("label", "label"),
    ("detection", "detection"),
    ("fuzzing", "fuzzing"),
    ("intruder", "intruder"),
    ("alive", "alive"),
]


class Links(Protocol):
    """Where a page's links point: server routes or files of a static export."""

    def static(self, name: str) -> str: ...
    def home(self) -> str: ...
    def index(self, n: int) -> str: ...
    def component(self, n: int, key: str) -> str | None: ...
    def compare(self) -> str | None: ...


def fmt(value: Any) -> str:
    """Numbers as the eval tables print them; ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2e}"
    return str(value)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spd_host.viewer", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["fmt"] = fmt
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def density_chart(hist: dict[str, Any]) -> dict[str, Any]:
    """Chart.js data: one dataset per site over log10-density bins (dead components apart)."""
    edges = hist.get("edges", DENSITY_BINS)
    labels = ["dead", *[f"{edges[i]:.2f}" for i in range(len(edges) - 1)]]
    palette = [
        "#e07b00",
        "#2a6fdb",
        "#2f9e44",
        "#b02a8f",
        "#7a5af8",
        "#c92a2a",
        "#0b7285",
        "#5c940d",
    ]
    datasets = [
        {
            "label": site,
            "data": [v["dead"], *v["counts"]],
            "backgroundColor": palette[i % len(palette)],
        }
        for i, (site, v) in enumerate(hist.get("sites", {}).items())
    ]
    return {"labels": labels, "datasets": datasets, "x": "log10 firing density", "y": "components"}


def activation_chart(bins: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    labels = [
        f"{b['lo']:.3g}–{b['hi']:.3g}" if math.isfinite(b["hi"]) else f"≥{b['lo']:.3g}"
        for b in bins
    ]
    return {
        "labels": labels,
        "datasets": [
            {"label": primary, "data": [b["count"] for b in bins], "backgroundColor": "#e07b00"}
        ],
        "x": f"|{primary}| (log-spaced bins)",
        "y": "firings",
    }
