"""Top/bottom logits per component: the decoder direction read through the unembedding.

``logit[c, t] = W_U[t] · d_c`` where ``d_c`` is component ``c``'s decoder row (what it adds to
the residual stream per unit activation) and ``W_U`` the base model's output embedding. The
final layer norm is not applied (it depends on the residual it normalises), as in the usual
"logit lens of a decoder" view; the docs list this as an approximation.

Computed once per harvest and stored beside it, in ``<harvest sub-run>/viewer/logits.safetensors``
(``<site>.top_ids``, ``<site>.top_values``, ``<site>.bottom_ids``, ``<site>.bottom_values``,
each ``[n_components, k]``), so pages and exports slice one row.

Which methods have a decoder: an adapter may implement ``decoder_directions(site) -> Tensor
[n_components, d_model] | None`` (``SupportsDecoder``; the CLT sums its decoders over the layers
a feature writes into, SPD gives ``U`` for sites writing into the residual stream and ``None``
for the others); otherwise an adapter whose ``dictionary(site)`` exposes a ``W_dec`` of that
shape is used. Sites without one get no logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spd_host.errors import ConfigError
from spd_host.viewer.source import DecompositionSource

LOGITS_FILE = "logits.safetensors"
CHUNK = 4096


@runtime_checkable
class SupportsDecoder(Protocol):
    def decoder_directions(self, site: str) -> torch.Tensor | None: ...


def logits_path(source: DecompositionSource) -> Path:
    return source.repo.path / "viewer" / LOGITS_FILE


def decoder_directions(adapter: Any, site: str, d_model: int) -> torch.Tensor | None:
    """``[n_components, d_model]`` or ``None`` when the method has no fixed decoder direction."""
    if isinstance(adapter, SupportsDecoder):
        directions = adapter.decoder_directions(site)
        return None if directions is None else directions.detach().float().cpu()
    dictionary = getattr(adapter, "dictionary", None)
    if callable(dictionary):
        w = getattr(dictionary(site), "W_dec", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == d_model:
            return w.detach().float().cpu()
    return None


def compute_logits(source: DecompositionSource, *, k: int = 10) -> Path | None:
    """Write the logits file for every site with a decoder; ``None`` if no site has one."""
    adapter = source.adapter
    model = adapter.load_base_model()
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        raise ConfigError(
            f"the base model of {source.decomposition_id} has no output embedding to read logits through"
        )
    W_U = emb.weight.detach().float().cpu()  # [V, d]
    tensors: dict[str, torch.Tensor] = {}
    for site in source.repo.layout.names:
        D = decoder_directions(adapter, site, int(W_U.shape[1]))
        if D is None:
            continue
        kk = min(k, int(W_U.shape[0]))
        tops, topv, bots, botv = [], [], [], []
        for lo in range(0, D.shape[0], CHUNK):
            L = D[lo : lo + CHUNK] @ W_U.T
            t = torch.topk(L, kk, dim=1)
            b = torch.topk(L, kk, dim=1, largest=False)
            tops.append(t.indices.to(torch.int32))
            topv.append(t.values)
            bots.append(b.indices.to(torch.int32))
            botv.append(b.values)
        tensors[f"{site}.top_ids"] = torch.cat(tops)
        tensors[f"{site}.top_values"] = torch.cat(topv)
        tensors[f"{site}.bottom_ids"] = torch.cat(bots)
        tensors[f"{site}.bottom_values"] = torch.cat(botv)
    if not tensors:
        return None
    path = logits_path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: v.contiguous() for n, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


class LogitTable:
    """Reads one component's stored logits (a slice per tensor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = safe_open(str(path), framework="pt")
        self._names = set(self._f.keys())

    @classmethod
    def load(cls, source: DecompositionSource) -> LogitTable | None:
        p = logits_path(source)
        return cls(p) if p.exists() else None

    def row(self, site: str, index: int) -> dict[str, list[tuple[int, float]]] | None:
        if f"{site}.top_ids" not in self._names:
            return None
        out = {}
        for side in ("top", "bottom"):
            ids = self._f.get_slice(f"{site}.{side}_ids")[index : index + 1][0].tolist()
            vals = self._f.get_slice(f"{site}.{side}_values")[index : index + 1][0].tolist()
            out[side] = list(zip(ids, vals, strict=True))
        return out

    def for_key(self, source: DecompositionSource, key: str) -> dict[str, Any] | None:
        from spd_host.adapter import parse_component_key

        site, index = parse_component_key(key)
        r = self.row(site, index)
        if r is None:
            return None
        return {
            side: [{"id": t, "text": source.decode(t), "value": v} for t, v in r[side]]
            for side in ("top", "bottom")
        }
