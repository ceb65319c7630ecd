"""``HarvestRepo``: lazy, read-only access to a finished harvest.

Nothing is loaded up front: scalar arrays are read on first use, token and co-occurrence rows
are sliced from the CSR tables through ``safetensors.safe_open`` (memory-mapped), and examples
are read per component from SQLite.
"""

from __future__ import annotations

import math
import sqlite3
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from spd_host.errors import ResultsNotFoundError
from spd_host.harvest.accumulator import Layout
from spd_host.harvest.config import HarvestConfig
from spd_host.harvest.models import (
    ActivationExample,
    ComponentDetail,
    ComponentSummary,
    TokenScore,
    TokenStats,
)
from spd_host.harvest.store import (
    DB_FILE,
    EXAMPLE_KINDS,
    EXAMPLES_FILE,
    RESULT_JSON,
    STATS_FILE,
)
from spd_host.harvest.token_stats import CoocMetric, cooc_score, token_lists
from spd_host.harvest.verify import read_meta, verify_files
from spd_host.harvest.windows import strip_padding


def harvest_root(decomposition_id: str) -> Path:
    """``results_dir(storage_key)/harvest`` of a decomposition ID (parsed via the plugin host)."""
    from spd_host.paths import results_dir
    from spd_host.plugins import get_host

    did = get_host().parse_id(decomposition_id)
    return results_dir(did.storage_key) / "harvest"


class HarvestRepo:
    """One finished harvest sub-run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_path = self.path / RESULT_JSON
        if not meta_path.exists():
            raise ResultsNotFoundError(
                f"no finished harvest in {self.path} ({RESULT_JSON} missing)",
                hint="run `spd-host harvest <id>` (or `spd-host harvest merge` after a sharded run)",
            )
        # verified on open: a damaged sub-run is a clear error here, not a traceback later
        self.meta: dict[str, Any] = read_meta(self.path)
        verify_files(self.path, self.meta)
        self.layout = Layout.from_json(self.meta["layout"])
        self._tokenizer: Any = None
        self.reused = False
        """Set by ``run_harvest`` when it returned this finished sub-run instead of computing."""

    @classmethod
    def open(cls, decomposition_id: str, run: str | None = None) -> HarvestRepo:
        """The named sub-run, or the most recently finished one."""
        root = harvest_root(decomposition_id)
        if run is not None:
            return cls(root / run)
        done = (
            sorted(root.glob(f"*/{RESULT_JSON}"), key=lambda p: p.stat().st_mtime)
            if root.exists()
            else []
        )
        if not done:
            raise ResultsNotFoundError(
                f"no finished harvest for {decomposition_id} under {root}",
                hint=f"run `spd-host harvest {decomposition_id}` first",
            )
        return cls(done[-1].parent)

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def adapter_id(self) -> str:
        return str(self.meta["decomposition_id"])

    @property
    def config(self) -> HarvestConfig:
        return HarvestConfig(**self.meta["config"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def run(self) -> str:
        return self.path.name

    # -- lazy readers -----------------------------------------------------------------------------
    @cached_property
    def _stats(self) -> Any:
        return safe_open(str(self.path / STATS_FILE), framework="pt")

    @cached_property
    def _example_file(self) -> Any:
        return safe_open(str(self.path / EXAMPLES_FILE), framework="pt")

    def _examples(self, key: str, g: int, kind: str) -> list[ActivationExample]:
        """One component's examples of one kind: a slice of each example array."""
        f = self._example_file
        indptr = f.get_slice(f"{kind}_indptr")[g : g + 2]
        lo, hi = int(indptr[0]), int(indptr[1])
        if hi == lo:
            return []
        score = f.get_slice(f"{kind}_score")[lo:hi].tolist()
        pos = f.get_slice(f"{kind}_pos")[lo:hi].tolist()
        tokens = f.get_slice(f"{kind}_tokens")[lo:hi].tolist()
        acts = f.get_slice(f"{kind}_acts")[lo:hi].tolist()
        fired = f.get_slice(f"{kind}_fired")[lo:hi].tolist()
        W = self.config.context_tokens
        out = []
        for rank in range(hi - lo):
            a, b = strip_padding(tokens[rank], W)
            out.append(
                ActivationExample(
                    key=key,
                    kind=kind,  # type: ignore[arg-type]
                    rank=rank,
                    score=score[rank],
                    position=pos[rank],
                    centre=W - a,
                    tokens=tokens[rank][a:b],
                    activations={
                        t: [v[i] for v in acts[rank][a:b]]
                        for i, t in enumerate(self.layout.act_types)
                    },
                    firings=fired[rank][a:b],
                )
            )
        return out

    def _tensor(self, name: str) -> torch.Tensor:
        return self._stats.get_tensor(name)

    def _row(self, table: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = self._stats.get_slice(f"{table}_indptr")[g : g + 2]
        lo, hi = int(indptr[0]), int(indptr[1])
        cols = self._stats.get_slice(f"{table}_cols")[lo:hi].to(torch.int64)
        values = self._stats.get_slice(f"{table}_values")[lo:hi]
        if not values.is_floating_point():
            values = values.to(torch.int64)  # stored narrow where every count fits
        return cols, values

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path / DB_FILE}?mode=ro", uri=True)

    def _index(self, key: str) -> int:
        try:
            return self.layout.index(key)
        except KeyError:
            raise ResultsNotFoundError(
                f"component {key!r} is not in harvest {self.path}",
                hint=f"keys look like '{self.layout.names[0]}:0'; sites: {', '.join(self.layout.names)}",
            ) from None

    # -- API --------------------------------------------------------------------------------------
    def summary(self) -> list[ComponentSummary]:
        return self._summaries(0, self.layout.total)

    def _summaries(self, lo: int, hi: int) -> list[ComponentSummary]:
        """Summaries of global indices ``lo:hi`` from slices of the stats arrays."""
        st = self._stats
        N = max(self.n_tokens, 1)
        fc_t = st.get_slice("firing_count")[lo:hi]
        fc = fc_t.tolist()
        mean_all = (st.get_slice("sum_all")[:, lo:hi] / N).tolist()
        mean_f = (st.get_slice("sum_firing")[:, lo:hi] / fc_t.clamp(min=1)).tolist()
        mx = st.get_slice("max_firing")[:, lo:hi].tolist()
        types = self.layout.act_types
        out = []
        for site, off, n in zip(
            self.layout.names, self.layout.offsets, self.layout.sizes, strict=True
        ):
            for g in range(max(lo, off), min(hi, off + n)):
                r, f = g - lo, fc[g - lo]
                out.append(
                    ComponentSummary(
                        key=f"{site}:{g - off}",
                        site=site,
                        index=g - off,
                        firing_count=f,
                        density=f / N,
                        mean_all={t: mean_all[i][r] for i, t in enumerate(types)},
                        mean_firing={t: (mean_f[i][r] if f else None) for i, t in enumerate(types)},
                        max_firing={t: (mx[i][r] if f else None) for i, t in enumerate(types)},
                    )
                )
        return out

    def component(self, key: str) -> ComponentDetail:
        g = self._index(key)
        (s,) = self._summaries(g, g + 1)
        examples = {kind: self._examples(key, g, kind) for kind in EXAMPLE_KINDS}
        hist = self._stats.get_slice("hist")[g : g + 1][0]
        kept = float(self._stats.get_slice("output_kept_mass")[g : g + 1][0])
        return ComponentDetail(
            **s.model_dump(),
            histogram_edges=self._tensor("hist_edges").tolist(),
            histogram_counts=hist.tolist(),
            output_mass_dropped=max(0.0, s.firing_count - kept),
            top_examples=examples["top"],
            reservoir_examples=examples["reservoir"],
        )

    def token_stats(
        self, key: str, kind: Literal["input", "output"], *, top: int = 10
    ) -> TokenStats:
        g = self._index(key)
        if kind not in ("input", "output"):
            raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
        cols, vals = self._row(kind, g)
        n_c = int(self._stats.get_slice("firing_count")[g : g + 1][0])
        total = self._tensor("token_count" if kind == "input" else "next_token_mass")
        bound = 0.0
        if kind == "output":
            bound = max(0.0, n_c - float(self._stats.get_slice("output_kept_mass")[g : g + 1][0]))
        lists = token_lists(
            cols,
            vals,
            total,
            n_c,
            self.n_tokens,
            top=top,
            min_support=self.config.min_token_support,
        )
        return TokenStats(
            key=key,
            kind=kind,
            firing_count=n_c,
            n_tokens=self.n_tokens,
            min_support=self.config.min_token_support,
            approximation_bound=bound,
            **lists,
        )

    def correlated(
        self, key: str, *, metric: CoocMetric = "pmi", top: int = 10
    ) -> list[tuple[str, float]]:
        """Components that fire together with ``key`` (over the co-occurrence token window)."""
        g = self._index(key)
        lo_p, lo_n = self._row("cooc_t", g)  # partners i < g
        hi_p, hi_n = self._row("cooc", g)  # partners j > g
        partners, n_ij = torch.cat([lo_p, hi_p]), torch.cat([lo_n, hi_n])
        if partners.numel() == 0:
            return []
        counts = self._tensor("cooc_count")
        scores = cooc_score(
            metric, n_ij, float(counts[g]), counts[partners], int(self.meta["cooc_n_tokens"])
        )
        o = torch.argsort(partners, stable=True)
        o = o[torch.argsort(scores[o], descending=True, stable=True)][:top]
        return [(self.layout.key(int(partners[i])), float(scores[i])) for i in o.tolist()]

    def token_scores_as_text(self, scores: list[TokenScore]) -> list[tuple[str, float]]:
        tok = self.tokenizer
        return [
            (tok.decode([s.token]) if tok is not None else str(s.token), s.value) for s in scores
        ]

    # -- rendering --------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from spd_host.plugins import get_host

            self._tokenizer = get_host().load_adapter(self.adapter_id).load_tokenizer()
        return self._tokenizer

    def render_example(self, example: ActivationExample) -> str:
        """Decode the window; firing tokens are wrapped in ``[[...]]`` and the centre in ``<<...>>``."""
        parts = []
        for i, (t, f) in enumerate(zip(example.tokens, example.firings, strict=True)):
            text = self.tokenizer.decode([t])
            if i == example.centre:
                text = f"<<{text}>>"
            elif f:
                text = f"[[{text}]]"
            parts.append(text)
        return "".join(parts)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
