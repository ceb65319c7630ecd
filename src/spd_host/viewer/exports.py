"""Exports for the viewers researchers already use: Neuronpedia feature JSON and circuit-tracer
feature files. Field names follow the published sources (cited in ``docs/viewer.md``):

- Neuronpedia: ``apps/webapp/prisma/schema.prisma`` in hijohnnylin/neuronpedia, models
  ``Neuron`` (``maxActApprox``, ``frac_nonzero``, ``pos_str``/``pos_values``,
  ``neg_str``/``neg_values``, ``freq_hist_data_bar_heights``/``_values``, ...), ``Activation``
  (``tokens``, ``values``, ``maxValue``, ``maxValueTokenIndex``, ``minValue``, ``binMin``,
  ``binMax``, ``binContains``, ``qualifyingTokenIndex``, ``dataIndex``) and ``Explanation``
  (``description``, ``explanationModelName``, ``typeName``).
- circuit-tracer: ``circuit_tracer/frontend/feature_models.py`` (the feature JSON) and
  ``circuit_tracer/frontend/assets/feature_examples/init-feature-examples.js`` (the packed
  layout: ``index.json.gz`` maps layer -> ``{filename, offsets}``; a feature is the byte range
  ``offsets[f]..offsets[f+1]`` of that layer's ``.bin``; feature ids are the Cantor pairing of
  ``(layer, feature)``).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spd_host.viewer.logits import LogitTable
from spd_host.viewer.pages import N_QUANTILES
from spd_host.viewer.source import DecompositionSource

Progress = Callable[[int, int], None] | None


def cantor_pair(layer: int, feature: int) -> int:
    """circuit-tracer's feature id of ``(layer, feature)`` (its frontend's ``cantorUnpair`` inverts it)."""
    s = layer + feature
    return s * (s + 1) // 2 + feature


def _bin_centres(edges: list[float]) -> list[float]:
    """Representative values of the harvest's histogram bins: 0-bin, geometric midpoints, last edge."""
    mids = [math.sqrt(edges[i] * edges[i + 1]) for i in range(len(edges) - 1)]
    return [edges[0] / 2, *mids, edges[-1]]


def _quantiles(examples: list[Any]) -> list[list[Any]]:
    ordered = sorted(examples, key=lambda e: (-e.score, e.position))
    n = len(ordered)
    return [
        ordered[q * n // N_QUANTILES : (q + 1) * n // N_QUANTILES]
        for q in range(N_QUANTILES)
        if ordered[q * n // N_QUANTILES : (q + 1) * n // N_QUANTILES]
    ]


# -- Neuronpedia ----------------------------------------------------------------------------------
def neuronpedia_feature(
    source: DecompositionSource, key: str, logits: LogitTable | None, model_id: str
) -> dict[str, Any]:
    """One feature in Neuronpedia's schema (``Neuron`` fields + ``activations`` + ``explanations``)."""
    d = source.repo.component(key)
    primary = source.primary

    def activation(ex: Any, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
        values = [float(v) for v in ex.activations[primary]]
        mx = max(values) if values else 0.0
        return {
            "tokens": [source.decode(t) for t in ex.tokens],
            "values": values,
            "maxValue": mx,
            "maxValueTokenIndex": values.index(mx) if values else 0,
            "minValue": min(values) if values else 0.0,
            "binMin": bin_min,
            "binMax": bin_max,
            "binContains": contains,
            "qualifyingTokenIndex": ex.centre,
            "dataIndex": str(ex.position),
        }

    acts = [activation(e, -1.0, -1.0, -1.0) for e in d.top_examples]  # top-k group
    frac_sampled = 1.0 / N_QUANTILES
    for part in _quantiles(d.reservoir_examples):
        acts += [activation(e, part[-1].score, part[0].score, frac_sampled) for e in part]
    lg = logits.for_key(source, key) if logits is not None else None
    explanations = [
        {
            "description": r.label,
            "explanationModelName": r.model,
            "typeName": r.strategy,
            "authorName": r.provider,
            "isBaseline": r.is_baseline,
        }
        for r in source.label_records(key)
        if r.status == "ok" and r.label
    ]
    return {
        "modelId": model_id,
        "layer": d.site,
        "index": str(d.index),
        "hookName": source.site_info(d.site)["reads_from"],
        "maxActApprox": d.max_firing.get(primary) or 0.0,
        "frac_nonzero": d.density,
        "freq_hist_data_bar_heights": [float(c) for c in d.histogram_counts],
        "freq_hist_data_bar_values": _bin_centres(d.histogram_edges),
        "pos_str": [t["text"] for t in lg["top"]] if lg else [],
        "pos_values": [t["value"] for t in lg["top"]] if lg else [],
        "neg_str": [t["text"] for t in lg["bottom"]] if lg else [],
        "neg_values": [t["value"] for t in lg["bottom"]] if lg else [],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "activations": acts,
        "explanations": explanations,
    }


def export_neuronpedia(
    source: DecompositionSource, out: Path, keys: Iterable[str], progress: Progress = None
) -> int:
    """``<out>/<site>/<index>.json`` per feature; returns the number written."""
    logits = LogitTable.load(source)
    model_id = str(source.adapter.base_model_name).replace("/", "-")
    keys = list(keys)
    for i, key in enumerate(keys):
        f = neuronpedia_feature(source, key, logits, model_id)
        path = out / f["layer"] / f"{f['index']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(f))
        if progress:
            progress(i + 1, len(keys))
    return len(keys)


# -- circuit-tracer -------------------------------------------------------------------------------
def circuit_tracer_feature(
    source: DecompositionSource, key: str, logits: LogitTable | None, transcoder_id: str
) -> dict[str, Any]:
    """One feature in circuit-tracer's ``feature_models.Model`` schema."""
    d = source.repo.component(key)
    primary = source.primary

    def example(ex: Any) -> dict[str, Any]:
        return {
            "tokens_acts_list": [float(v) for v in ex.activations[primary]],
            "train_token_ind": ex.centre,
            "is_repeated_datapoint": False,
            "tokens": [source.decode(t) for t in ex.tokens],
        }

    groups = [
        {"quantile_name": "Top activations", "examples": [example(e) for e in d.top_examples]}
    ]
    qvals = []
    for q, part in enumerate(_quantiles(d.reservoir_examples)):
        groups.append(
            {"quantile_name": f"Quantile {q + 1}", "examples": [example(e) for e in part]}
        )
        qvals.append(part[-1].score)
    all_acts = [
        float(v) for e in [*d.top_examples, *d.reservoir_examples] for v in e.activations[primary]
    ]
    lg = logits.for_key(source, key) if logits is not None else None
    return {
        "transcoder_id": transcoder_id,
        "index": d.index,
        "examples_quantiles": groups,
        "top_logits": [t["text"] for t in lg["top"]] if lg else [],
        "bottom_logits": [t["text"] for t in lg["bottom"]] if lg else [],
        "act_min": min(all_acts) if all_acts else 0.0,
        "act_max": d.max_firing.get(primary) or 0.0,
        "quantile_values": qvals,
        "histogram": [float(c) for c in d.histogram_counts],
        "activation_frequency": d.density,
    }


def export_circuit_tracer(
    source: DecompositionSource, out: Path, progress: Progress = None
) -> Path:
    """``<out>/features/index.json.gz`` + ``<out>/features/<site>.bin`` (every feature of every site).

    Each feature is one gzip member of its site's ``.bin``; ``offsets[f]`` is where feature ``f``
    starts and ``offsets[f + 1]`` where it ends (``len(offsets) = n_features + 1``). Sites are
    circuit-tracer layers in harvest order (layer index = site position).
    """
    feats = out / "features"
    feats.mkdir(parents=True, exist_ok=True)
    logits = LogitTable.load(source)
    tid = source.decomposition_id
    layout = source.repo.layout
    index: list[dict[str, Any]] = []
    done, total = 0, layout.total
    for layer, (site, n) in enumerate(zip(layout.names, layout.sizes, strict=True)):
        filename = f"{site}.bin"
        offsets = [0]
        with (feats / filename).open("wb") as f:
            for i in range(n):
                blob = json.dumps(circuit_tracer_feature(source, f"{site}:{i}", logits, tid))
                data = gzip.compress(blob.encode(), compresslevel=6, mtime=0)
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                done += 1
                if progress:
                    progress(done, total)
        index.append({"layer": layer, "site": site, "filename": filename, "offsets": offsets})
    path = feats / "index.json.gz"
    path.write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
    return path
