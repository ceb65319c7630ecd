"""Token datasets: sources tokenize as by hand, order is seeded, shards/resume/splits are exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spd_host.data import (
    TokenDatasetSpec,
    available_tokens,
    check_seq_len,
    heldout_start,
    iter_token_batches,
    load_token_stream,
)
from spd_host.demo import demo_model_dir
from spd_host.errors import ConfigError, DatasetError
from spd_host.models import load_tokenizer
from spd_host.paths import cache_dir

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "You are all resolved rather to die than to famish?",
    "Resolved. resolved.\n\nFirst, you know Caius Marcius is chief enemy to the people.",
] * 25


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(demo_model_dir()))


def by_hand(tokenizer, docs: list[str]) -> list[int]:
    """The documented stream: each document's ids followed by EOS."""
    out: list[int] = []
    for doc in docs:
        out += [*tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
    return out


def expected_sequences(stream: list[int], seq_len: int, split: str) -> list[list[int]]:
    start = heldout_start(len(stream))
    part = stream[:start] if split == "train" else stream[start:]
    return [part[i * seq_len : (i + 1) * seq_len] for i in range(len(part) // seq_len)]


def rows(batches) -> list[list[int]]:
    return [row for batch in batches for row in batch.tolist()]


@pytest.fixture
def txt(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    return path


# ---- sources tokenize exactly as documented ----------------------------------------------------


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_txt_is_one_document(txt: Path, tokenizer, split: str) -> None:
    reference = by_hand(tokenizer, ["\n\n".join(DOCS)])
    spec = TokenDatasetSpec(source=str(txt), seq_len=16, split=split, shuffle=False)
    assert rows(iter_token_batches(spec, tokenizer, batch_size=5)) == expected_sequences(
        reference, 16, split
    )


def test_jsonl_documents_are_joined_with_eos(jsonl: Path, tokenizer) -> None:
    reference = by_hand(tokenizer, DOCS)
    assert load_token_stream(str(jsonl), tokenizer, text_column="body").tolist() == reference
    spec = TokenDatasetSpec(source=str(jsonl), text_column="body", seq_len=10, shuffle=False)
    assert rows(iter_token_batches(spec, tokenizer, batch_size=7)) == expected_sequences(
        reference, 10, "train"
    )


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_directory(tmp_path: Path, tokenizer, as_dict: bool) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))})
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))})
    ds.save_to_disk(str(tmp_path / "ds"))
    spec = TokenDatasetSpec(
        source=str(tmp_path / "ds"), text_column="content", seq_len=12, shuffle=False
    )
    got = rows(iter_token_batches(spec, tokenizer, batch_size=4))
    assert got == expected_sequences(by_hand(tokenizer, DOCS), 12, "train")


def test_demo_source_is_the_shipped_corpus(tokenizer) -> None:
    from spd_host.demo import demo_corpus_path

    reference = by_hand(tokenizer, [demo_corpus_path().read_text()])
    spec = TokenDatasetSpec(seq_len=64, shuffle=False)
    first = next(iter_token_batches(spec, tokenizer, batch_size=3))
    assert first.tolist() == [reference[i * 64 : (i + 1) * 64] for i in range(3)]
    assert available_tokens(spec, tokenizer) == (heldout_start(len(reference)) // 64) * 64


def test_batches_are_int64_with_a_short_last_batch(txt: Path, tokenizer) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=16)
    batches = list(iter_token_batches(spec, tokenizer, batch_size=7))
    n_seq = available_tokens(spec, tokenizer) // 16
    assert all(b.dtype == torch.int64 and b.shape[1] == 16 for b in batches)
    assert [b.shape[0] for b in batches] == [7] * (n_seq // 7) + ([n_seq % 7] if n_seq % 7 else [])


# ---- order, shards, resume, splits -------------------------------------------------------------


def test_order_is_deterministic_for_a_seed(txt: Path, tokenizer) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=8, seed=7)
    a = rows(iter_token_batches(spec, tokenizer, batch_size=4))
    b = rows(iter_token_batches(spec, tokenizer, batch_size=4))
    c = rows(iter_token_batches(spec.model_copy(update={"seed": 8}), tokenizer, batch_size=4))
    unshuffled = rows(
        iter_token_batches(spec.model_copy(update={"shuffle": False}), tokenizer, batch_size=4)
    )
    assert a == b
    assert a != c
    assert a != unshuffled
    assert sorted(a) == sorted(c) == sorted(unshuffled)  # same sequences, different order


def test_shards_are_disjoint_and_cover_everything(txt: Path, tokenizer) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=8, seed=1)
    full = list(iter_token_batches(spec, tokenizer, batch_size=3))
    world = 3
    shards = [
        list(iter_token_batches(spec, tokenizer, batch_size=3, rank=r, world_size=world))
        for r in range(world)
    ]
    for r, shard in enumerate(shards):  # rank r takes every world-th batch
        assert [b.tolist() for b in shard] == [b.tolist() for b in full[r::world]]
    # together the shards hold exactly the unsharded sequences (as a multiset)
    assert sorted(row for shard in shards for row in rows(shard)) == sorted(rows(full))


def test_n_tokens_and_shards(txt: Path, tokenizer) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=8, seed=2)
    full = rows(iter_token_batches(spec, tokenizer, batch_size=4))
    limited = rows(iter_token_batches(spec, tokenizer, batch_size=4, n_tokens=100))
    assert limited == full[: math.ceil(100 / 8)]  # a shorter run is a prefix of a longer one
    sharded = [
        rows(iter_token_batches(spec, tokenizer, batch_size=4, n_tokens=100, rank=r, world_size=2))
        for r in range(2)
    ]
    assert sorted(sharded[0] + sharded[1]) == sorted(limited)


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2), (2, 3)])
def test_start_batch_resumes_exactly(txt: Path, tokenizer, rank: int, world_size: int) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=8, seed=3)
    kw = {"batch_size": 2, "rank": rank, "world_size": world_size}
    full = [b.tolist() for b in iter_token_batches(spec, tokenizer, **kw)]
    resumed = [b.tolist() for b in iter_token_batches(spec, tokenizer, start_batch=3, **kw)]
    assert resumed == full[3:]
    assert list(iter_token_batches(spec, tokenizer, start_batch=len(full), **kw)) == []


@pytest.mark.parametrize("seq_len", [8, 13, 32])
def test_train_and_heldout_are_disjoint_at_every_seq_len(
    jsonl: Path, tokenizer, seq_len: int
) -> None:
    stream = by_hand(tokenizer, DOCS)
    boundary = heldout_start(len(stream))
    assert len(stream) - boundary == len(stream) // 10
    for split, lo, hi in [("train", 0, boundary), ("heldout", boundary, len(stream))]:
        spec = TokenDatasetSpec(
            source=str(jsonl), text_column="body", seq_len=seq_len, split=split, seed=5
        )
        got = rows(iter_token_batches(spec, tokenizer, batch_size=4))
        # every sequence sits at a seq_len-aligned offset inside its own part of the stream
        starts = range(lo, hi - seq_len + 1, seq_len)
        assert sorted(got) == sorted(stream[s : s + seq_len] for s in starts)


# ---- cache -------------------------------------------------------------------------------------


def test_token_stream_is_cached_and_invalidated(txt: Path, tokenizer) -> None:
    first = load_token_stream(str(txt), tokenizer)
    files = sorted(cache_dir("tokens").rglob("*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(files[0])["tokens"].long(), first)
    assert torch.equal(load_token_stream(str(txt), tokenizer), first)
    assert sorted(cache_dir("tokens").rglob("*")) == sorted(
        cache_dir("tokens").rglob("*")
    )  # no temp files left
    assert not list(cache_dir("tokens").rglob("*.tmp"))

    txt.write_text("A different text entirely.")
    changed = load_token_stream(str(txt), tokenizer)
    assert changed.tolist() == by_hand(tokenizer, ["A different text entirely."])
    assert len(list(cache_dir("tokens").rglob("*.safetensors"))) == 2


# ---- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DatasetError, match="not found"):
        next(
            iter_token_batches(
                TokenDatasetSpec(source=str(tmp_path / "nope.txt")), tokenizer, batch_size=1
            )
        )


def test_empty_file(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        load_token_stream(str(tmp_path / "empty.txt"), tokenizer)


def test_unsupported_extension(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DatasetError, match="unsupported extension"):
        load_token_stream(str(tmp_path / "data.csv"), tokenizer)


def test_jsonl_missing_column_names_the_line(jsonl: Path, tokenizer) -> None:
    with pytest.raises(
        DatasetError, match=r"docs.jsonl:1 has no 'text' field \(it has \['body', 'id'\]\)"
    ):
        load_token_stream(str(jsonl), tokenizer)


def test_save_to_disk_missing_column(tmp_path: Path, tokenizer) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match=r"no column 'text' \(it has \['body'\]\)"):
        load_token_stream(str(tmp_path / "ds"), tokenizer)


def test_directory_that_is_not_a_dataset(tmp_path: Path, tokenizer) -> None:
    pytest.importorskip("datasets")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match="save_to_disk"):
        load_token_stream(str(tmp_path / "junk"), tokenizer)


def test_uncached_hub_dataset_offline(
    tokenizer, offline_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    # datasets reads the offline flag at import, which may predate this test's environment
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="not cached"):
        load_token_stream("nobody-here/no-such-dataset", tokenizer)


def test_too_many_tokens_says_how_many_exist(txt: Path, tokenizer) -> None:
    spec = TokenDatasetSpec(source=str(txt), seq_len=16)
    available = available_tokens(spec, tokenizer)
    assert len(list(iter_token_batches(spec, tokenizer, batch_size=4, n_tokens=available))) > 0
    with pytest.raises(DatasetError, match=f"holds .* = {available:,} tokens"):
        list(iter_token_batches(spec, tokenizer, batch_size=4, n_tokens=available + 16))


def test_seq_len_longer_than_a_split(txt: Path, tokenizer) -> None:
    with pytest.raises(DatasetError, match="fewer than one sequence"):
        list(
            iter_token_batches(
                TokenDatasetSpec(source=str(txt), seq_len=10_000, split="heldout"),
                tokenizer,
                batch_size=1,
            )
        )


def test_check_seq_len_against_the_model_context() -> None:
    from transformers import GPT2Config, LlamaConfig

    check_seq_len(256, GPT2Config(n_positions=256))
    with pytest.raises(DatasetError, match="longer than the model's context of 256"):
        check_seq_len(257, GPT2Config(n_positions=256))
    with pytest.raises(DatasetError, match="context of 64"):
        check_seq_len(65, LlamaConfig(max_position_embeddings=64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 1, "rank": 2, "world_size": 2},
        {"batch_size": 1, "start_batch": -1},
        {"batch_size": 1, "n_tokens": 0},
    ],
)
def test_bad_arguments(txt: Path, tokenizer, kwargs) -> None:
    with pytest.raises(ConfigError):
        next(iter_token_batches(TokenDatasetSpec(source=str(txt)), tokenizer, **kwargs))


def test_spec_is_frozen_and_strict() -> None:
    spec = TokenDatasetSpec()
    with pytest.raises(ValueError):
        spec.seq_len = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        TokenDatasetSpec(sorce="demo")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        TokenDatasetSpec(split="test")  # type: ignore[arg-type]


@pytest.mark.parametrize("special", [{}, {"bos_token": "<|endoftext|>"}])
def test_boundary_token_without_eos(jsonl: Path, special: dict[str, str]) -> None:
    """No EOS: the BOS (if any) separates documents; with neither, documents simply abut."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(demo_model_dir() / "tokenizer.json"), **special
    )
    assert tok.eos_token_id is None
    sep = [tok.bos_token_id] if special else []
    expected = [i for doc in DOCS[:10] for i in [*tok.encode(doc, add_special_tokens=False), *sep]]
    got = load_token_stream(str(jsonl), tok, text_column="body").tolist()
    assert got[: len(expected)] == expected


def test_jsonl_bad_lines(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 is not valid JSON"):
        load_token_stream(str(tmp_path / "bad.jsonl"), tokenizer)
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DatasetError, match=r"num.jsonl:1: field 'text' is int, not a string"):
        load_token_stream(str(tmp_path / "num.jsonl"), tokenizer)
