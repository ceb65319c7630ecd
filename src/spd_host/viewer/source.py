"""One decomposition as the viewer sees it: harvest (``HarvestRepo``), labels, eval results, adapter.

Everything is read through the public readers (``HarvestRepo``, ``LabelStore``,
``spd_host.evals.load_result``) and only when first asked for, so opening a source costs one
``harvest.json`` read however large the harvest is.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

from spd_host.errors import ResultsNotFoundError
from spd_host.harvest import HarvestRepo

JUDGE_SUITES = ("detection", "fuzzing", "intruder")


class DecompositionSource:
    """Lazy access to everything stored for one decomposition ID."""

    def __init__(self, decomposition_id: str, harvest_run: str | None = None) -> None:
        from spd_host.plugins import get_host

        self.decomposition_id = decomposition_id
        self.did = get_host().parse_id(decomposition_id)
        self.repo = HarvestRepo.open(decomposition_id, harvest_run)
        from spd_host.autointerp.store import default_db_path
        from spd_host.evals.results import evals_dir

        # resolved once: a running server keeps reading the stores it was started on
        self.labels_path: Path = default_db_path(self.storage_key)
        self.evals_dir: Path = evals_dir(self.storage_key)
        self._decoded: dict[int, str] = {}

    # -- identity ---------------------------------------------------------------------------------
    @property
    def storage_key(self) -> str:
        return str(self.did.storage_key)

    @property
    def primary(self) -> str:
        return str(self.repo.layout.act_types[0])

    @cached_property
    def adapter(self) -> Any:
        from spd_host.plugins import get_host

        return get_host().load_adapter(self.repo.adapter_id)

    @cached_property
    def tokenizer(self) -> Any:
        return self.repo.tokenizer

    def decode(self, token: int) -> str:
        """One token's text (cached: pages decode the same tokens many times)."""
        t = int(token)
        if t not in self._decoded:
            tok = self.tokenizer
            self._decoded[t] = str(tok.decode([t])) if tok is not None else f"<{t}>"
        return self._decoded[t]

    def method_info(self) -> dict[str, str]:
        m = self.adapter.method
        return {"name": str(m.name), "description": str(m.description)}

    def site_info(self, site: str) -> dict[str, Any]:
        """The site's canonical hook points and a human description."""
        from spd_host.autointerp.bridge import describe_location

        s = next((x for x in self.adapter.sites if x.name == site), None)
        if s is None:
            return {"name": site, "reads_from": site, "writes_to": [], "description": ""}
        return {
            "name": s.name,
            "reads_from": s.reads_from,
            "writes_to": list(s.writes_to),
            "address": s.address,
            "n_components": s.n_components,
            "description": s.description or describe_location(s.reads_from, None),
        }

    # -- labels -----------------------------------------------------------------------------------
    def label_records(self, key: str | None = None) -> list[Any]:
        """Stored label rows (newest first), failures included; [] when nothing is stored."""
        from spd_host.autointerp.store import LabelStore

        if not self.labels_path.exists():
            return []
        with LabelStore(self.labels_path) as store:
            return store.records(component_key=key)

    def best_labels(self) -> dict[str, Any]:
        """The newest ok label of each component (the one the index shows)."""
        out: dict[str, Any] = {}
        for r in self.label_records():
            if r.status == "ok" and r.label and r.component_key not in out:
                out[r.component_key] = r
        return out

    # -- evals ------------------------------------------------------------------------------------
    def eval_results(self) -> list[Any]:
        """Every stored eval result this host can read (unreadable files are skipped)."""
        out: list[Any] = []
        d = self.evals_dir
        if not d.exists():
            return out
        for path in sorted(d.glob("*.json")):
            model = _result_model(path.stem)
            if model is None:
                continue
            from spd_host.evals import load_result

            try:
                out.append(load_result(path, model))
            except Exception:  # a foreign or older file must not take the page down
                continue
        return out

    def judge_scores(self) -> dict[str, dict[str, float | None]]:
        """``suite -> key -> score`` for the per-component judge suites."""
        out: dict[str, dict[str, float | None]] = {}
        for r in self.eval_results():
            if r.suite in JUDGE_SUITES:
                out[r.suite] = {c.key: c.score for c in r.components}
        return out

    def fingerprint(self) -> str:
        """Changes whenever labels or eval results change (so caches know to refresh)."""
        parts = [str(self.repo.path)]
        paths = [
            self.repo.path / "harvest.json",
            self.labels_path,
            self.labels_path.with_name(self.labels_path.name + "-wal"),
        ]
        d = self.evals_dir
        if d.exists():
            paths += sorted(d.glob("*.json"))
        for p in paths:
            if p.exists():
                st = p.stat()
                parts.append(f"{p.name}:{st.st_mtime_ns}:{st.st_size}")
        return "|".join(parts)


def _result_model(suite: str) -> Any:
    if suite in JUDGE_SUITES:
        from spd_host.evals.llm.suites import JudgeResult

        return JudgeResult
    if suite == "fidelity":
        from spd_host.evals.fidelity import FidelityResult

        return FidelityResult
    return None


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def open_sources(ids: list[str], harvest_run: str | None = None) -> list[DecompositionSource]:
    """Open each ID; a clear error naming the one without a harvest."""
    if not ids:
        raise ResultsNotFoundError(
            "no decomposition ID given", hint="e.g. `spd-host serve transcoder:demo`"
        )
    return [DecompositionSource(i, harvest_run) for i in ids]
