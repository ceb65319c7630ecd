"""The embedding and surprisal suites on the toy harvest, with tiny local models written in
the real Hugging Face / sentence-transformers layout. Every window score is recomputed here
by hand (plain transformers, mean pooling; a manual forward and cross-entropy) and every
AUROC by brute force over all (activating, non-activating) pairs."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spd_host.evals import run_suite
from spd_host.evals.llm.embedding import bag_of_words
from spd_host.evals.llm.local_scorer import build_windows, window_text
from spd_host.evals.llm.scorer_configs import EmbeddingConfig, SurprisalConfig
from spd_host.evals.llm.stats import auroc, pearson
from spd_host.plugins import get_host
from tests.evals.test_judge_suites import _write_labels
from tests.evals.tiny_hf import build_causal_lm, build_embedder


def _brute_auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _check_aurocs(result: Any) -> None:
    for c in result.components:
        pos = [w.score for w in c.windows if w.kind != "non-activating"]
        neg = [w.score for w in c.windows if w.kind == "non-activating"]
        assert c.auroc == pytest.approx(_brute_auroc(pos, neg), abs=1e-9)
        assert c.difference == pytest.approx(np.mean(pos) - np.mean(neg), abs=1e-9)
    scored = [c.auroc for c in result.components if c.auroc is not None]
    assert result.score == pytest.approx(float(np.mean(scored)), abs=1e-12)


def _write(did: str, labels: dict[str, str]) -> None:
    from spd_host.autointerp.store import LabelRecord, LabelStore, default_db_path
    from spd_host.harvest import HarvestRepo

    repo = HarvestRepo.open(did)
    with LabelStore(default_db_path(get_host().parse_id(did).storage_key)) as store:
        for key, label in labels.items():
            store.write(
                LabelRecord(
                    harvest_id=repo.run, component_key=key, strategy="s", model="m",
                    provider="p", decomposition_id=did, status="ok", is_baseline=False,
                    label=label, confidence="high", reasoning="", raw_response="",
                    system_prompt="", prompt="", error=None, cost_usd=0.0, input_tokens=0,
                    output_tokens=0, attempts=1, started_at="t2", finished_at="t2",
                ),
                replace=True,
            )  # fmt: skip


def test_stats_match_numpy_and_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(20):
        x = [rng.choice([0.0, 1.0, 2.5, rng.random()]) for _ in range(30)]
        y = [rng.random() for _ in range(30)]
        assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
        pos, neg = x[:12], x[12:]  # ties included
        assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg), abs=1e-12)
    assert pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) is None
    assert auroc([], [1.0]) is None


def test_embedding_with_a_local_sentence_transformer(harvested: str, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    _write_labels(harvested)
    model_dir = build_embedder(tmp_path / "emb")
    config = EmbeddingConfig(
        model=str(model_dir), n_components=12, n_activating=5, n_nonactivating=5
    )
    result = run_suite("embedding", harvested, config)
    assert not result.baseline and result.model == str(model_dir)
    assert result.n_components_scored == 12
    _check_aurocs(result)
    assert 0.3 < result.score < 0.7  # random weights: chance

    # the same similarities by hand: plain transformers, mean pooling, cosine
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> torch.Tensor:
        batch = tok([text], return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state[0]
        return h.mean(0).double()

    for c in result.components[:4]:
        q = embed(config.query_prefix + c.label)
        for w in c.windows:
            d = embed(w.text)
            want = float(torch.dot(q, d) / (q.norm() * d.norm()))
            assert w.score == pytest.approx(want, abs=1e-5)

    # the plain-transformers fallback (no sentence-transformers) embeds the same
    from spd_host.evals.llm.embedding import _hf_encoder

    sample = [w.text for w in result.components[0].windows]
    fallback = _hf_encoder(model_dir, 3, "cpu")(sample).double()
    manual = torch.stack([embed(t) for t in sample])
    assert torch.allclose(fallback, manual, atol=1e-5)

    # resume: a second run scores nothing again and reports the same
    key = get_host().parse_id(harvested).storage_key
    from spd_host.evals.results import evals_dir

    log = evals_dir(key) / "embedding.trials.jsonl"
    n = len(log.read_text().splitlines())
    again = run_suite("embedding", harvested, config)
    assert len(log.read_text().splitlines()) == n and again.score == result.score


def test_embedding_baseline_oracle_labels_score_one_random_labels_chance(harvested: str) -> None:
    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    config = EmbeddingConfig(model="offline", n_components=16, n_activating=5, n_nonactivating=5)
    windows, _, setup = build_windows(adapter, "embedding", config)
    texts = {k: [window_text(w, setup.decode) for w in ws] for k, ws in windows.items()}
    oracle = {}
    for k, ws in windows.items():
        neg_words = set().union(
            *(bag_of_words(t) for w, t in zip(ws, texts[k], strict=True) if not w.activating)
        )
        pos_words = set().union(
            *(bag_of_words(t) for w, t in zip(ws, texts[k], strict=True) if w.activating)
        )
        oracle[k] = " ".join(sorted(pos_words - neg_words)) or "nothing"
    _write(harvested, oracle)
    result = run_suite("embedding", harvested, config)
    assert result.baseline and any("BASELINE" in n for n in result.notes)
    _check_aurocs(result)
    assert result.score > 0.95

    rng = random.Random(1)
    vocab = sorted(set().union(*(bag_of_words(t) for ts in texts.values() for t in ts)))
    _write(harvested, {k: " ".join(rng.sample(vocab, 6)) for k in windows})
    rand = run_suite("embedding", harvested, config)
    _check_aurocs(rand)
    assert 0.3 < rand.score < 0.7


def test_surprisal_with_a_local_causal_lm(harvested: str, tmp_path: Path) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spd_host.evals.llm.surprisal import prefix_text

    _write_labels(harvested)
    lm_dir = build_causal_lm(tmp_path / "lm")
    config = SurprisalConfig(model=str(lm_dir), n_components=12, n_activating=4, n_nonactivating=4)
    result = run_suite("surprisal", harvested, config)
    assert result.n_components_scored == 12
    _check_aurocs(result)
    assert 0.25 < result.score < 0.75  # random weights: chance

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()

    def loss(prefix: str, text: str) -> float:
        p = tok(prefix, add_special_tokens=False)["input_ids"]
        w = tok(text, add_special_tokens=False)["input_ids"]
        if len(w) < 2:  # no token after the first: the scorer counts 0
            return 0.0
        with torch.no_grad():
            logits = model(torch.tensor([p + w])).logits[0].double()
        # window tokens 1..n-1, each predicted from everything before it
        return float(F.cross_entropy(logits[len(p) : len(p) + len(w) - 1], torch.tensor(w[1:])))

    for c in result.components[:3]:
        for w in c.windows:
            want = loss(prefix_text(config.null_description), w.text) - loss(
                prefix_text(c.label), w.text
            )
            assert w.score == pytest.approx(want, abs=1e-5)


def test_surprisal_defaults_to_the_base_model(harvested: str) -> None:
    _write_labels(harvested)
    result = run_suite(
        "surprisal", harvested, SurprisalConfig(n_components=4, n_activating=3, n_nonactivating=3)
    )
    assert "base model" in result.model and any("base model" in n for n in result.notes)
    assert result.n_components_scored == 4
    _check_aurocs(result)


def test_a_model_not_on_disk_is_a_clear_error(harvested: str) -> None:
    from spd_host.errors import SourceNotFoundError

    _write_labels(harvested)
    with pytest.raises(SourceNotFoundError, match="local Hugging Face cache"):
        run_suite(
            "embedding", harvested, EmbeddingConfig(model="nobody/not-a-model", n_components=2)
        )
