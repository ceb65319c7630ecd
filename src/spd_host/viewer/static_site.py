"""``spd-host dashboard``: the same pages as ``serve``, written as static files.

Layout of ``--out DIR`` (opens from ``file://``, no server, no network)::

    index.html            the index (sorted/filtered/searched in the page, from data/index.js)
    data/index.js         ``window.SPD_INDEX = {...}``: one row per exported component
                          (a script, not JSON, because browsers refuse fetch() on file://)
    c/<key>.html          one page per component, its data inline (``:`` in keys becomes ``__``)
    static/               CSS, JS and the vendored Chart.js

Data is split per page: 10,000 components are 10,000 small pages plus an index of ~300 bytes
per row, never one giant file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from spd_host.errors import ConfigError
from spd_host.viewer.index import ComponentIndex, IndexQuery
from spd_host.viewer.logits import LogitTable
from spd_host.viewer.pages import component_page
from spd_host.viewer.render import (
    INDEX_COLUMNS,
    STATIC_DIR,
    activation_chart,
    density_chart,
    render,
)
from spd_host.viewer.source import JUDGE_SUITES, DecompositionSource

STATIC_ROW_FIELDS = (
    "gidx", "key", "site", "density", "mean_act", "max_act", "label", "label_model",
    "label_strategy", "label_baseline", "detection", "fuzzing", "intruder", "alive",
    "input_tokens", "output_tokens", "href",
)  # fmt: skip


def page_name(key: str) -> str:
    """A component's file name (``layer_0:12`` -> ``layer_0__12.html``)."""
    return key.replace(":", "__").replace("/", "_") + ".html"


class StaticLinks:
    def __init__(self, depth: int, included: set[str]) -> None:
        self.up = "../" * depth
        self.included = included

    def static(self, name: str) -> str:
        return f"{self.up}static/{name}"

    def home(self) -> str:
        return f"{self.up}index.html"

    def index(self, n: int) -> str:
        return f"{self.up}index.html"

    def component(self, n: int, key: str) -> str | None:
        return f"{self.up}c/{page_name(key)}" if key in self.included else None

    def compare(self) -> str | None:
        return None


def select_keys(
    index: ComponentIndex,
    *,
    components: list[str] | None = None,
    top: int | None = None,
    search: str | None = None,
) -> list[str]:
    """Keys to export: given keys, else the ``top`` densest (optionally matching ``search``)."""
    if components:
        missing = [k for k in components if index.row(k) is None]
        if missing:
            raise ConfigError(
                f"components not in the harvest: {', '.join(missing[:5])}",
                hint="keys look like '<site>:<index>'; see `spd-host serve` or `spd-host show`",
            )
        return list(dict.fromkeys(components))
    keys = index.keys(IndexQuery(sort="density", desc=True, q=search, alive="alive"), limit=top)
    if not keys:
        raise ConfigError(
            f"no component matches{f' search {search!r}' if search else ''}",
            hint="try a different --search, or pass --components",
        )
    return keys


def write_dashboard(
    source: DecompositionSource,
    out: Path,
    *,
    components: list[str] | None = None,
    top: int | None = 100,
    search: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write the static dashboard; return the exported keys."""
    index = ComponentIndex(source).ensure(background_tokens=False)
    keys = select_keys(index, components=components, top=top, search=search)
    included = set(keys)
    logits = LogitTable.load(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "c").mkdir(exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    shutil.copytree(STATIC_DIR, out / "static", dirs_exist_ok=True)
    common = {"decomps": [source.decomposition_id], "n": 0}
    rows = []
    for i, key in enumerate(keys):
        c = component_page(source, index, key, logits)
        links = StaticLinks(1, included)
        html = render(
            "component.html",
            c=c,
            links=links,
            hist_chart=activation_chart(c["histogram"], c["primary"]),
            **common,
        )
        (out / "c" / page_name(key)).write_text(html)
        row = index.row(key)
        assert row is not None
        row["href"] = f"c/{page_name(key)}"
        rows.append({k: row[k] for k in STATIC_ROW_FIELDS})
        if progress:
            progress(i + 1, len(keys))
    (out / "data" / "index.js").write_text(
        "window.SPD_INDEX = "
        + json.dumps({"decomposition_id": source.decomposition_id, "rows": rows})
        + ";\n"
    )
    html = render(
        "index_static.html",
        links=StaticLinks(0, included),
        did=source.decomposition_id,
        method=source.method_info(),
        n_rows=len(rows),
        density_chart=density_chart(index.density_histogram()),
        sites=list(source.repo.layout.names),
        judge_suites=JUDGE_SUITES,
        columns=INDEX_COLUMNS,
        **common,
    )
    (out / "index.html").write_text(html)
    return keys
