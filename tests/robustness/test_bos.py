"""Whether a sequence starts with BOS is one dataset option (``--prepend-bos``), defaulting to
what the decomposition recorded, else to what its tokenizer does; it is applied where
sequences are built (``spd_host.data``), recorded in the harvest config and part of its run
key, and used by ``eval fidelity`` the same way.

The tokenizers are real ones built here in the on-disk layout of each family: a GPT-2
byte-level BPE (``<|endoftext|>`` only, adds nothing) and a Llama-style one (``<s>`` BOS
added on encode, ``</s>`` EOS). The expected sequences are built by hand from the documented
rule: the stream is each document's ids followed by the boundary token (EOS); with BOS the
split is cut into ``seq_len - 1``-token bodies and BOS goes in front of each.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spd_host.data import (
    TokenDatasetSpec,
    available_tokens,
    heldout_start,
    iter_token_batches,
    resolve_prepend_bos,
    tokenization_record,
)
from spd_host.errors import ConfigError
from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
from spd_host.plugins import temporary_plugins
from tests.robustness import bos_toy

SEQ = 8


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    return {"gpt2": bos_toy.gpt2_tokenizer(), "llama": bos_toy.llama_tokenizer()}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in bos_toy.DOCS * 6))
    return path


def stream_by_hand(tok: Any) -> list[int]:
    out: list[int] = []
    for doc in bos_toy.DOCS * 6:
        out += [*tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
    return out


def expected_rows(tok: Any, split: str, bos: bool) -> list[list[int]]:
    stream = stream_by_hand(tok)
    start = heldout_start(len(stream))
    part = stream[:start] if split == "train" else stream[start:]
    body = SEQ - 1 if bos else SEQ
    pieces = [part[i * body : (i + 1) * body] for i in range(len(part) // body)]
    return [[tok.bos_token_id, *p] if bos else p for p in pieces]


def test_the_default_is_the_tokenizers_own_habit(tokenizers: dict[str, Any]) -> None:
    gpt2, llama = tokenizers["gpt2"], tokenizers["llama"]
    # what each family does when it encodes a text, checked on the tokenizers themselves
    assert gpt2("a")["input_ids"][0] != gpt2.bos_token_id
    assert llama("a")["input_ids"][0] == llama.bos_token_id == 1
    assert resolve_prepend_bos(None, {}, gpt2) is False
    assert resolve_prepend_bos(None, {}, llama) is True
    # what the decomposition recorded wins over the tokenizer, the option over both
    assert resolve_prepend_bos(None, {"prepend_bos": True}, gpt2) is True
    assert resolve_prepend_bos(None, {"prepend_bos": False}, llama) is False
    assert resolve_prepend_bos(False, {"prepend_bos": True}, llama) is False


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("bos", [False, True])
def test_sequences_are_bos_then_stream_bodies(
    tokenizers: dict[str, Any], corpus: Path, family: str, split: str, bos: bool
) -> None:
    tok = tokenizers[family]
    spec = TokenDatasetSpec(
        source=str(corpus), split=split, seq_len=SEQ, shuffle=False, prepend_bos=bos
    )
    got = [row for b in iter_token_batches(spec, tok, batch_size=3) for row in b.tolist()]
    want = expected_rows(tok, split, bos)
    assert got == want and all(len(r) == SEQ for r in got)
    assert available_tokens(spec, tok) == len(want) * SEQ
    # shuffled: the same sequences in another order
    shuffled = spec.model_copy(update={"shuffle": True})
    rows = [r for b in iter_token_batches(shuffled, tok, batch_size=3) for r in b.tolist()]
    assert sorted(rows) == sorted(want)


def test_prepend_bos_without_a_bos_token_is_refused(corpus: Path) -> None:
    from tests.evals.toy_plugin import build_tokenizer

    tok = build_tokenizer()  # unk and eos only
    spec = TokenDatasetSpec(source=str(corpus), seq_len=SEQ, prepend_bos=True)
    with pytest.raises(ConfigError, match="has no BOS token") as err:
        next(iter_token_batches(spec, tok, batch_size=2))
    assert err.value.hint == "pass --no-prepend-bos"


@pytest.fixture
def btoy() -> Iterator[None]:
    bos_toy.SEEN.clear()
    with temporary_plugins(("btoy", bos_toy), entry_points=False):
        yield


def _harvest(root: Path, corpus: Path, **kw: Any) -> HarvestRepo:
    config = HarvestConfig(
        dataset=str(corpus),
        n_tokens=6 * SEQ,
        batch_size=3,
        seq_len=SEQ,
        examples_per_component=2,
        context_tokens=1,
        **kw,
    )
    bos_toy.SEEN.clear()
    repo = run_harvest(f"btoy:{root}", config, progress=False)
    assert repo is not None
    return repo


@pytest.mark.parametrize(
    ("family", "record", "given", "expect"),
    [
        ("gpt2", None, None, False),  # GPT-2: no BOS
        ("llama", None, None, True),  # Llama: BOS, as its tokenizer does
        ("llama", {"prepend_bos": False}, None, False),  # the decomposition says no
        ("gpt2", {"prepend_bos": True}, None, True),  # the decomposition says yes
        ("llama", None, False, False),  # --no-prepend-bos
        ("gpt2", None, True, True),  # --prepend-bos
    ],
)
def test_harvest_applies_and_records_the_choice(
    btoy: None,
    tokenizers: dict[str, Any],
    corpus: Path,
    tmp_path: Path,
    family: str,
    record: dict[str, Any] | None,
    given: bool | None,
    expect: bool,
) -> None:
    tok = tokenizers[family]
    root = bos_toy.write_decomposition(tmp_path / family, tok, record)
    repo = _harvest(root, corpus, prepend_bos=given)
    seen = torch.cat(bos_toy.SEEN)
    assert seen.shape == (6, SEQ)
    want = expected_rows(tok, "train", expect)
    assert all(row in want for row in seen.tolist())  # the sequences the rule builds
    if expect:
        assert bool((seen[:, 0] == tok.bos_token_id).all())
    assert repo.config.prepend_bos is expect
    assert repo.meta["tokenization"]["bos_at_sequence_start"] is expect
    # the BOS component fired on each sequence's first token (and on no EOS for Llama)
    counts = {s.key: s.firing_count for s in repo.summary()}
    if expect and family == "llama":
        assert counts["0.mlp:0"] == 6


def test_bos_is_part_of_the_run_key_and_old_keys_stay(
    btoy: None, tokenizers: dict[str, Any], corpus: Path, tmp_path: Path
) -> None:
    root = bos_toy.write_decomposition(tmp_path / "llama", tokenizers["llama"])
    with_bos = _harvest(root, corpus)
    without = _harvest(root, corpus, prepend_bos=False)
    assert with_bos.path != without.path and not without.reused
    assert _harvest(root, corpus, prepend_bos=True).reused  # the default resolved to True
    # a run without BOS has the key of the formula from before the option existed
    from spd_host.harvest.runner import input_fingerprints

    old_identity = without.config.model_dump(
        mode="json", exclude={"device", "prepend_bos", "pipeline", "background_merge"}
    )  # fields added later that are not part of the key
    adapter = bos_toy.BosAdapter(f"btoy:{root}", root)
    doc = {
        "id": f"btoy:{root}",
        "config": old_identity,
        "inputs": input_fingerprints(adapter, without.config),
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]
    assert without.path.name == f"run-{digest}"


def test_tokenization_record_says_what_was_done(tokenizers: dict[str, Any]) -> None:
    llama = tokenization_record(tokenizers["llama"], prepend_bos=True)
    assert llama["bos_token_id"] == 1 and llama["boundary_token"] == "eos"
    assert llama["tokenizer_encodes_bos"] is True and llama["bos_at_sequence_start"] is True
    gpt2 = tokenization_record(tokenizers["gpt2"])
    assert gpt2["tokenizer_encodes_bos"] is False and gpt2["bos_at_sequence_start"] is False


def test_saelens_recorded_prepend_bos_reaches_the_defaults(tmp_path: Path) -> None:
    from spd_host.plugins import get_host
    from tests.transcoder.test_formats import write_saelens

    g = torch.Generator().manual_seed(0)
    write_saelens(tmp_path / "new", "standard", gen=g)
    cfg = json.loads((tmp_path / "new" / "cfg.json").read_text())
    cfg["metadata"]["prepend_bos"] = False  # SAELens >= 6: SAEMetadata.prepend_bos
    (tmp_path / "new" / "cfg.json").write_text(json.dumps(cfg))
    write_saelens(tmp_path / "old", "standard", gen=g, legacy=True, extra={"prepend_bos": True})
    host = get_host()
    assert (
        host.load_adapter(f"transcoder:{tmp_path / 'new'}").defaults.extra["prepend_bos"] is False
    )
    assert host.load_adapter(f"transcoder:{tmp_path / 'old'}").defaults.extra["prepend_bos"] is True
    write_saelens(tmp_path / "none", "standard", gen=g)
    assert "prepend_bos" not in host.load_adapter(f"transcoder:{tmp_path / 'none'}").defaults.extra


@pytest.mark.slow
def test_eval_fidelity_uses_the_same_bos_sequences() -> None:
    """``eval fidelity --prepend-bos`` on the demo: its clean CE is the base model's CE on
    sequences built by hand (held-out stream bodies of ``seq_len - 1``, BOS in front, in the
    seeded order), so the eval saw exactly those tokens."""
    import numpy as np
    import torch.nn.functional as F

    from spd_host.data import load_token_stream
    from spd_host.evals.configs import FidelityConfig
    from spd_host.evals.fidelity import run_fidelity
    from spd_host.plugins import get_host

    adapter = get_host().load_adapter("transcoder:demo")
    tok = adapter.load_tokenizer()
    cfg = FidelityConfig(
        n_tokens=4 * 16, seq_len=16, batch_size=4, prepend_bos=True, use_harvest=False
    )
    result = run_fidelity(adapter, cfg)
    assert result.prepend_bos is True and result.n_sequences == 4

    stream = load_token_stream("demo", tok).tolist()
    held = stream[heldout_start(len(stream)) :]
    bodies = [held[i * 15 : (i + 1) * 15] for i in range(len(held) // 15)]
    order = np.random.default_rng(0).permutation(len(bodies))[:4]
    tokens = torch.tensor([[tok.bos_token_id, *bodies[i]] for i in order])
    with torch.no_grad():
        logits = adapter.load_base_model()(tokens).logits.double()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert result.loss_row().ce_clean == pytest.approx(float(ce), abs=1e-5)


def test_the_recorded_text_column_is_honoured(
    btoy: None, tokenizers: dict[str, Any], tmp_path: Path
) -> None:
    """A decomposition that records its text column (SAELens/Goodfire configs do) is harvested
    from that column without --text-column; --text-column still wins."""
    tok = tokenizers["gpt2"]
    corpus = tmp_path / "body.jsonl"
    corpus.write_text(
        "".join(json.dumps({"body": d, "text": "x"}) + "\n" for d in bos_toy.DOCS * 6)
    )
    root = bos_toy.write_decomposition(tmp_path / "d", tok, {"dataset_column": "body"})
    repo = _harvest(root, corpus)
    assert repo.config.dataset_column == "body"
    want = expected_rows(tok, "train", False)  # the rows of the "body" documents
    assert all(row in want for row in torch.cat(bos_toy.SEEN).tolist())
    with pytest.raises(Exception, match="has no 'nosuch' field"):
        _harvest(root, corpus, dataset_column="nosuch")
