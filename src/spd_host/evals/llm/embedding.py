"""The embedding suite (delphi's embedding scorer): does the label retrieve the windows on
which the component fires?

A sentence-embedding model embeds ``query_prefix + label`` as the query and every window's
text; the score of a window is the cosine similarity of its embedding with the query's, and a
component's score is the AUROC of that similarity separating its activating windows from
windows on which it does not fire (chance 0.5). The model is a local directory or a model in
the local Hugging Face cache (``pip install 'spd-host[embed]'`` for sentence-transformers,
which reads the model's own pooling config; without it, plain transformers with mean pooling
over the attention mask, which is what such models' pooling config says for most of them).

``model="offline"`` (and the default when ``DEFAULT_MODEL`` is not cached) is a BASELINE, no
model: the cosine similarity of bag-of-words counts (lowercased words and punctuation marks).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spd_host.adapter import DecompositionAdapter
from spd_host.evals.llm.hf_local import in_local_cache, local_model_dir, pick_device
from spd_host.evals.llm.local_scorer import LocalScorerResult, ScoreTexts, run_local_scorer
from spd_host.evals.llm.scorer_configs import EmbeddingConfig

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
OFFLINE = "offline"
_WORD = re.compile(r"\w+|[^\w\s]")


def bag_of_words(text: str) -> Counter[str]:
    return Counter(w.lower() for w in _WORD.findall(text))


def cosine_counts(a: Counter[str], b: Counter[str]) -> float:
    dot = math.fsum(a[w] * b[w] for w in a.keys() & b.keys())
    na = math.sqrt(math.fsum(v * v for v in a.values()))
    nb = math.sqrt(math.fsum(v * v for v in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def baseline_scorer(prefix: str) -> ScoreTexts:
    """The offline BASELINE: bag-of-words cosine of the label (without the prefix) and windows."""

    def score(label: str, texts: Sequence[str]) -> list[float]:
        q = bag_of_words(label)
        return [cosine_counts(q, bag_of_words(t)) for t in texts]

    return score


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of the token embeddings over the attention mask (sentence-transformers' ``mean``)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def model_scorer(path: Path, prefix: str, batch_size: int, device: str) -> ScoreTexts:
    """Cosine similarity of query and window embeddings under a local sentence-embedding model."""
    import torch

    encode = _st_encoder(path, batch_size, device) or _hf_encoder(path, batch_size, device)

    def score(label: str, texts: Sequence[str]) -> list[float]:
        with torch.inference_mode():
            q = encode([prefix + label])
            d = encode(list(texts))
            sims = torch.nn.functional.cosine_similarity(q.double(), d.double(), dim=-1)
        return [float(s) for s in sims]

    return score


def _st_encoder(path: Path, batch_size: int, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(path), device=device, local_files_only=True)
    return lambda texts: model.encode(
        texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
    ).cpu()


def _hf_encoder(path: Path, batch_size: int, device: str) -> Any:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    max_len = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    def encode(texts: list[str]) -> Any:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]).cpu())
        return torch.cat(out)

    return encode


def run_embedding(adapter: DecompositionAdapter, config: EmbeddingConfig) -> LocalScorerResult:
    name = config.model
    notes: list[str] = []
    if name is None:
        name = DEFAULT_MODEL if in_local_cache(DEFAULT_MODEL) else OFFLINE
        if name == OFFLINE:
            notes.append(f"{DEFAULT_MODEL} is not in the local Hugging Face cache")
    baseline = name == OFFLINE
    if baseline:
        notes.append(
            "offline BASELINE embedder (bag-of-words cosine), not a sentence-embedding model"
        )

    def make() -> ScoreTexts:
        if baseline:
            return baseline_scorer(config.query_prefix)
        path = local_model_dir(str(name), "sentence-embedding model")
        return model_scorer(
            path, config.query_prefix, config.batch_size, pick_device(config.device)
        )

    return run_local_scorer(
        "embedding",
        adapter,
        config,
        model_name=str(name),
        baseline=baseline,
        make_scorer=make,
        settings={"query_prefix": config.query_prefix},
        notes=notes,
    )
