"""Oracle and random labels through the surprisal and embedding scorers' real model paths.

A tiny decomposition (``topics``) has one component per topic, firing on that topic's words;
its harvest is made of single-topic sequences. Judges that know the topics are written to disk
in the real layouts (GPT-2 ``config.json`` + ``model.safetensors`` + ``tokenizer.json``; a
sentence-transformers BERT with its mean-pooling and normalise modules), their weights set by
hand so their behaviour has a closed form:

- the causal LM, having read a topic word anywhere before, adds ``BOOST`` to the logits of that
  topic's words (uniform over the vocabulary otherwise), so a window's surprisal score is
  ``BOOST * (share of the topic's words among tokens 2..n) - log(Z / V)``;
- the embedder maps a topic word and that topic's words to the topic's direction and every
  other token to zero, so a window's similarity to a label is ``n_topic / |n|`` over its
  per-topic word counts.

The oracle label (the topic word, which never occurs in a window) must score AUROC > 0.95;
labels drawn at random among the topic words, independently of the component, ~0.5 (their
expectation is exactly 0.5 when negatives come evenly from the other topics: the right label
with chance 1/T scores 1, a wrong one (T-2)/(2(T-1)) on average); the bag-of-words baseline,
which cannot know that "fruit" means "apple", exactly 0.5. Every window score is checked
against the closed form and every AUROC by brute force over all pairs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spd_host.adapter import DecompositionDefaults, HarvestBatch, HarvestOptions, MethodInfo, Site
from spd_host.evals import run_suite
from spd_host.evals.llm.scorer_configs import EmbeddingConfig, SurprisalConfig
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId
from tests.evals.test_local_scorers import _write
from tests.evals.tiny_hf import build_embedder

TOPICS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape"),
    "animal": ("horse", "tiger", "rabbit", "eagle"),
    "metal": ("iron", "copper", "silver", "gold"),
    "weather": ("rain", "snow", "wind", "storm"),
    "music": ("piano", "guitar", "drum", "violin"),
    "sport": ("soccer", "tennis", "hockey", "golf"),
    "tool": ("hammer", "saw", "drill", "wrench"),
    "colour": ("red", "green", "blue", "yellow"),
}
TOPIC_NAMES = list(TOPICS)
FILLER = ("the", "and", "of", "a", "to", "in", "is", "it", "with", "on")
T = len(TOPICS)
SITE = "0.topics"
DID = "topics:demo"
BOOST = 3.0  # the oracle LM's logit boost of the described topic's words
SEQ, BATCH, N_BATCHES = 16, 8, 4
THRESHOLD = 0.5

# the decomposition's vocabulary: every word with its leading space, as a BPE tokenizer has them
DECOMP_WORDS = [*FILLER, *(w for ws in TOPICS.values() for w in ws)]
TOPIC_OF = {w: k for k, ws in enumerate(TOPICS.values()) for w in ws}


def _brute_auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ---- the `topics` decomposition: component k fires on topic k's words --------------------


class _Table(torch.nn.Module):
    """The "base model": a lookup of each token's activation of each component."""

    def __init__(self) -> None:
        super().__init__()
        acts = torch.zeros(len(DECOMP_WORDS), T)
        for i, w in enumerate(DECOMP_WORDS):
            if w in TOPIC_OF:  # 1.0 .. 4.0 by the word's place in its topic: quantile bins
                acts[i, TOPIC_OF[w]] = 1.0 + TOPICS[TOPIC_NAMES[TOPIC_OF[w]]].index(w)
        self.acts = torch.nn.Parameter(acts, requires_grad=False)


def _decomp_tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f" {w}": i for i, w in enumerate(DECOMP_WORDS)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


class _TopicAdapter:
    def __init__(self, did: DecompositionId) -> None:
        self.decomposition_id = did.normalized
        self.method = MethodInfo(name="topics", description="One component per topic (tests).")
        self.sites = [Site(name=SITE, n_components=T, reads_from="0.in", writes_to=("0.out",))]
        self.activation_types = ("activation",)
        self.base_model_name = "topics"
        self.defaults = DecompositionDefaults(seq_len=SEQ)
        self._model = _Table()

    def load_base_model(self) -> _Table:
        return self._model

    def load_tokenizer(self) -> Any:
        return _decomp_tokenizer()


class _TopicPlugin:
    @hookimpl
    def register_methods(self, register: Callable[[MethodInfo], None]) -> None:
        register(MethodInfo(name="topics", description="One component per topic (tests)."))

    @hookimpl
    def load_decomposition(self, decomposition_id: DecompositionId) -> _TopicAdapter | None:
        return _TopicAdapter(decomposition_id) if decomposition_id.method == "topics" else None

    @hookimpl
    def harvest_fn(self, adapter: Any, options: HarvestOptions) -> Callable[..., HarvestBatch]:
        table = adapter.load_base_model().acts

        def fn(tokens: torch.Tensor) -> HarvestBatch:
            acts = table[tokens.cpu()]
            logits = torch.zeros(*tokens.shape, len(DECOMP_WORDS) + 1)
            return HarvestBatch(
                tokens=tokens,
                firings={SITE: acts > options.threshold},
                activations={SITE: {"activation": acts}},
                next_token_logits=logits if options.next_token else None,
            )

        return fn


def _topic_batches(rank: int, world_size: int, start_batch: int) -> Iterator[torch.Tensor]:
    """Single-topic sequences: each token a word of the row's topic (p=0.5) or a filler word."""
    rng = random.Random(11)
    ids = {w: i for i, w in enumerate(DECOMP_WORDS)}
    for b in range(N_BATCHES):
        rows = []
        for r in range(BATCH):
            words = TOPICS[TOPIC_NAMES[(b * BATCH + r) % T]]
            rows.append(
                [
                    ids[rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER)]
                    for _ in range(SEQ)
                ]
            )
        if b >= start_batch and b % world_size == rank:
            yield torch.tensor(rows, dtype=torch.long)


@pytest.fixture
def topics_harvest() -> Iterator[str]:
    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins

    with temporary_plugins(("topics", _TopicPlugin()), entry_points=False):
        config = HarvestConfig(
            n_tokens=SEQ * BATCH * N_BATCHES, batch_size=BATCH, seq_len=SEQ,
            examples_per_component=8, context_tokens=4, output_top_k=5, min_token_support=1,
            threshold=THRESHOLD,
        )  # fmt: skip
        run_harvest(DID, config, batches=_topic_batches, progress=False)
        yield DID


def _oracle_labels() -> dict[str, str]:
    return {f"{SITE}:{k}": name for k, name in enumerate(TOPIC_NAMES)}


def _random_labels(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"{SITE}:{k}": rng.choice(TOPIC_NAMES) for k in range(T)}


def _words(text: str) -> list[str]:
    return text.split()


def _check_aurocs(result: Any) -> None:
    assert result.n_components_scored == T
    for c in result.components:
        pos = [w.score for w in c.windows if w.kind != "non-activating"]
        neg = [w.score for w in c.windows if w.kind == "non-activating"]
        assert pos and neg
        assert c.auroc == pytest.approx(_brute_auroc(pos, neg), abs=1e-12)
    assert result.score == pytest.approx(
        math.fsum(c.auroc for c in result.components) / T, abs=1e-12
    )


# ---- the oracle causal LM ----------------------------------------------------------------


def _pair(d: int, k: int) -> torch.Tensor:
    """+1, -1 on dims 2k, 2k+1: zero mean, so a LayerNorm only rescales it."""
    v = torch.zeros(d)
    v[2 * k], v[2 * k + 1] = 1.0, -1.0
    return v


def build_topic_lm(path: Path) -> tuple[Path, int]:
    """A 1-layer GPT-2 that reads a topic word anywhere before and boosts that topic's words.

    Every token but a topic word embeds as the constant pair ``c``; topic word k as ``u_k``.
    Attention is uniform (zero queries and keys); values copy ``u_k`` (scaled so it swamps
    ``c`` after the final LayerNorm whatever the position) and drop ``c``; the MLP and the
    position embeddings are zero. The (untied) unembedding reads ``u_k`` into ``BOOST`` on
    topic k's words, so with no topic word read every logit is 0.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>", *TOPIC_NAMES, *DECOMP_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", model_max_length=128,
    )  # fmt: skip
    d = 2 * T + 2
    cfg = GPT2Config(
        n_layer=1, n_embd=d, n_head=1, n_inner=4, vocab_size=len(vocab), n_positions=128,
        bos_token_id=1, eos_token_id=1, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    c = _pair(d, T)
    scale = math.sqrt(d / 2)  # a LayerNorm's output of any pair
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        block = model.transformer.h[0]
        for ln in (block.ln_1, block.ln_2, model.transformer.ln_f):
            ln.weight.fill_(1.0)
        wte = model.transformer.wte.weight
        wte[:] = c
        for k, name in enumerate(TOPIC_NAMES):
            wte[vocab[name]] = _pair(d, k)
        # values: the topic dims, x 1e5 (u_k still dominates c at the 128th position)
        attn = block.attn
        for i in range(2 * T):
            attn.c_attn.weight[i, 2 * d + i] = 1e5
            attn.c_proj.weight[i, i] = 1.0
        for w, k in TOPIC_OF.items():
            model.lm_head.weight[vocab[w]] = BOOST * _pair(d, k) / (2 * scale)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path, len(vocab)


def _surprisal_reference(label: str, text: str, vocab_size: int) -> float:
    """The oracle LM's window score in closed form (null loss - label loss)."""
    words = _words(text)
    if len(words) < 2:
        return 0.0
    if label not in TOPICS:
        return 0.0
    log_z_over_v = math.log((4 * math.exp(BOOST) + vocab_size - 4) / vocab_size)
    hits = sum(w in TOPICS[label] for w in words[1:])
    return BOOST * hits / (len(words) - 1) - log_z_over_v


def test_surprisal_oracle_labels_score_one_random_labels_chance(
    topics_harvest: str, tmp_path: Path
) -> None:
    lm_dir, vocab_size = build_topic_lm(tmp_path / "topic-lm")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in lm_dir.iterdir()
    }
    config = SurprisalConfig(
        model=str(lm_dir), n_components=None, n_activating=5, n_nonactivating=5
    )

    def run(labels: dict[str, str]) -> Any:
        _write(topics_harvest, labels)
        result = run_suite("surprisal", topics_harvest, config)
        _check_aurocs(result)
        for c in result.components:
            assert c.label == labels[c.component_key]
            for w in c.windows:
                want = _surprisal_reference(c.label, w.text, vocab_size)
                assert w.score == pytest.approx(want, abs=1e-4)
        return result

    oracle = run(_oracle_labels())
    assert oracle.score > 0.95 and all(c.auroc > 0.9 for c in oracle.components)
    assert oracle.mean_difference > 0.5

    rand = [run(_random_labels(seed)).score for seed in (1, 2, 3)]
    assert 0.35 < sum(rand) / len(rand) < 0.65, rand


# ---- the oracle sentence embedder ----------------------------------------------------------


def build_topic_embedder(path: Path) -> Path:
    """A sentence-transformers BERT (mean pooling, normalise) whose output is the bag of topics.

    Word embeddings: topic word k and topic k's words ``u_k``, every other token 0 (a
    LayerNorm of 0 is 0); position and type embeddings 0; the layer's attention values, its
    output and its feed-forward output 0, so each of its LayerNorms gives back its input. The
    mean pooled over the mask is then proportional to ``sum_k n_k u_k``.
    """
    from transformers import BertModel

    words = [*TOPIC_NAMES, *DECOMP_WORDS]
    build_embedder(path, hidden=2 * T, words=words)
    model = BertModel.from_pretrained(path).eval()
    vocab = _bert_vocab(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        emb = model.embeddings.word_embeddings.weight
        for k, name in enumerate(TOPIC_NAMES):
            emb[vocab[name]] = _pair(2 * T, k)
        for w, k in TOPIC_OF.items():
            emb[vocab[w]] = _pair(2 * T, k)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _bert_vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(path).get_vocab())


def _embedding_reference(label: str, text: str) -> float:
    counts = Counter(TOPIC_OF[w] for w in _words(text) if w in TOPIC_OF)
    norm = math.sqrt(math.fsum(n * n for n in counts.values()))
    return counts[TOPIC_NAMES.index(label)] / norm if norm else 0.0


@pytest.mark.slow  # sentence-transformers' import and five model loads
def test_embedding_oracle_labels_score_one_random_labels_chance(
    topics_harvest: str, tmp_path: Path
) -> None:
    from spd_host.evals.llm.embedding import _hf_encoder

    # through sentence-transformers when installed (the dev extra), else plain transformers
    emb_dir = build_topic_embedder(tmp_path / "topic-embedder")
    assert {"modules.json", "1_Pooling", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in emb_dir.iterdir()
    }
    config = EmbeddingConfig(
        model=str(emb_dir), n_components=None, n_activating=5, n_nonactivating=5
    )

    def run(labels: dict[str, str], cfg: EmbeddingConfig = config) -> Any:
        _write(topics_harvest, labels)
        result = run_suite("embedding", topics_harvest, cfg)
        _check_aurocs(result)
        return result

    oracle = run(_oracle_labels())
    assert not oracle.baseline and oracle.model == str(emb_dir)
    for c in oracle.components:
        for w in c.windows:
            assert w.score == pytest.approx(_embedding_reference(c.label, w.text), abs=1e-5)
    assert oracle.score > 0.95 and all(c.auroc > 0.9 for c in oracle.components)
    # the plain-transformers path (mean pooling over the mask) embeds the same
    c = oracle.components[0]
    emb = _hf_encoder(emb_dir, 4, "cpu")(
        [EmbeddingConfig().query_prefix + c.label, *(w.text for w in c.windows)]
    )
    sims = torch.nn.functional.cosine_similarity(emb[:1].double(), emb[1:].double(), dim=-1)
    assert sims.tolist() == pytest.approx([w.score for w in c.windows], abs=1e-5)

    rand = []
    for seed in (1, 2, 3):
        r = run(_random_labels(seed))
        for c in r.components:
            for w in c.windows:
                assert w.score == pytest.approx(_embedding_reference(c.label, w.text), abs=1e-5)
        rand.append(r.score)
    assert 0.35 < sum(rand) / len(rand) < 0.65, rand

    # the bag-of-words baseline cannot know that "fruit" retrieves "apple": exactly chance
    base = run(_oracle_labels(), config.model_copy(update={"model": "offline"}))
    assert base.baseline and base.score == pytest.approx(0.5, abs=1e-12)
