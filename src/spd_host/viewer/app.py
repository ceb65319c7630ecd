"""``spd-host serve``: a small Starlette (ASGI) app with server-rendered pages.

Routes: ``/`` (the decompositions), ``/d/<n>/`` (index of decomposition ``n``: paginated,
sorted and filtered in SQLite), ``/d/<n>/c/<key>`` (a component), ``/compare`` (two or more
decompositions), ``/static/...`` (CSS, JS and the vendored Chart.js), ``/api/status``.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from spd_host.errors import SpdHostError
from spd_host.viewer import compare as compare_mod
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


class ServerLinks:
    def static(self, name: str) -> str:
        return f"/static/{name}"

    def home(self) -> str:
        return "/"

    def index(self, n: int) -> str:
        return f"/d/{n}/"

    def component(self, n: int, key: str) -> str | None:
        return f"/d/{n}/c/{quote(key, safe=':')}"

    def compare(self) -> str | None:
        return "/compare"


class Viewer:
    """The sources and their index caches; the app's routes read from here."""

    def __init__(self, sources: list[DecompositionSource], *, background_tokens: bool = True):
        self.sources = sources
        self.indexes = [
            ComponentIndex(s).ensure(background_tokens=background_tokens) for s in sources
        ]
        self.logits = [LogitTable.load(s) for s in sources]
        self.links = ServerLinks()

    def close(self) -> None:
        for i in self.indexes:
            i.stop()

    def _common(self) -> dict[str, Any]:
        return {"links": self.links, "decomps": [s.decomposition_id for s in self.sources]}

    def _source(self, n: int) -> tuple[DecompositionSource, ComponentIndex]:
        if not 0 <= n < len(self.sources):
            raise _NotFoundError(f"no decomposition number {n}")
        return self.sources[n], self.indexes[n]

    # -- pages ------------------------------------------------------------------------------------
    def home(self, request: Request) -> Response:
        rows = [
            {
                "id": s.decomposition_id,
                "method": s.method_info()["name"],
                "components": s.repo.layout.total,
                "n_tokens": s.repo.n_tokens,
                "run": s.repo.run,
            }
            for s in self.sources
        ]
        return HTMLResponse(render("home.html", rows=rows, **self._common()))

    def index(self, request: Request) -> Response:
        n = int(request.path_params["n"])
        source, index = self._source(n)
        q = parse_query(dict(request.query_params))
        rows, total = index.query(q)
        pages = max(1, math.ceil(total / q.per_page))
        base = {k: v for k, v in request.query_params.items() if v != ""}

        def sort_link(col: str) -> str:
            desc = not q.desc if q.sort == col else col not in ("key", "site", "label")
            return "?" + urlencode({**base, "sort": col, "desc": int(desc), "page": 1})

        def page_link(p: int) -> str:
            return "?" + urlencode({**base, "page": p})

        html = render(
            "index.html",
            n=n,
            did=source.decomposition_id,
            method=source.method_info(),
            status=index.status(),
            density_chart=density_chart(index.density_histogram()),
            sites=list(source.repo.layout.names),
            judge_suites=JUDGE_SUITES,
            q=q,
            rows=rows,
            total=total,
            pages=pages,
            columns=[c for c in INDEX_COLUMNS if c[0] != "alive"] + [("alive", "alive")],
            sort_link=sort_link,
            page_link=page_link,
            **self._common(),
        )
        return HTMLResponse(html)

    def component(self, request: Request) -> Response:
        n = int(request.path_params["n"])
        source, index = self._source(n)
        key = request.path_params["key"]
        c = component_page(source, index, key, self.logits[n])
        html = render(
            "component.html",
            n=n,
            c=c,
            hist_chart=activation_chart(c["histogram"], c["primary"]),
            **self._common(),
        )
        return HTMLResponse(html)

    def compare(self, request: Request) -> Response:
        html = render(
            "compare.html",
            eval_tables=compare_mod.eval_tables(self.sources),
            base_models=compare_mod.base_models(self.sources),
            matches=compare_mod.matches(self.sources, self.indexes),
            **self._common(),
        )
        return HTMLResponse(html)

    def status(self, request: Request) -> Response:
        return JSONResponse(
            {
                s.decomposition_id: i.status()
                for s, i in zip(self.sources, self.indexes, strict=True)
            }
        )


class _NotFoundError(SpdHostError):
    """A page that does not exist (404)."""


def parse_query(params: dict[str, str]) -> IndexQuery:
    """Query-string parameters -> a validated ``IndexQuery`` (``ConfigError`` on bad values)."""
    from spd_host.errors import ConfigError

    def num(name: str) -> float | None:
        v = params.get(name, "").strip()
        if not v:
            return None
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {v!r}") from None

    try:
        return IndexQuery(
            sort=params.get("sort") or "density",
            desc=params.get("desc", "1") not in ("0", "false"),
            site=params.get("site") or None,
            dmin=num("dmin"),
            dmax=num("dmax"),
            score=params.get("score") or None,
            smin=num("smin"),
            alive=params.get("alive") or "all",
            q=params.get("q") or None,
            page=int(params.get("page") or 1),
            per_page=int(params.get("per_page") or 50),
        ).validated()
    except ValueError:
        raise ConfigError("page and per_page must be integers") from None


def create_app(viewer: Viewer) -> Starlette:
    def guard(fn: Any) -> Any:
        def endpoint(request: Request) -> Response:
            try:
                return fn(request)  # type: ignore[no-any-return]
            except _NotFoundError as err:
                return HTMLResponse(f"<h1>not found</h1><p>{err.message}</p>", status_code=404)
            except SpdHostError as err:
                status = 404 if "not in harvest" in err.message else 400
                return HTMLResponse(
                    f"<h1>error</h1><p>{_esc(err.message)}</p><p>{_esc(err.hint or '')}</p>",
                    status_code=status,
                )

        return endpoint

    routes = [
        Route("/", guard(viewer.home)),
        Route("/d/{n:int}/", guard(viewer.index)),
        Route("/d/{n:int}/c/{key:path}", guard(viewer.component)),
        Route("/compare", guard(viewer.compare)),
        Route("/api/status", guard(viewer.status)),
        Mount("/static", app=StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    return Starlette(routes=routes)


def _esc(text: str) -> str:
    import html

    return html.escape(text)
