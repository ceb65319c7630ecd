"""The decomposition-ID grammar, checked against hand-written expectations."""

from __future__ import annotations

from pathlib import Path

import pytest

from spd_host.errors import DecompositionIdError, SourceNotFoundError
from spd_host.ids import SourceKind, fetch_source, parse_decomposition_id
from tests.conftest import add_to_offline_hub

METHODS = ["clt", "spd", "transcoder"]
SHORT = {"spd": r"s-[0-9a-z]{8}"}


def parse(raw: str, cwd: Path | None = None):
    return parse_decomposition_id(raw, methods=METHODS, short_id_patterns=SHORT, cwd=cwd)


def test_demo() -> None:
    did = parse("transcoder:demo")
    assert (did.method, did.kind, did.normalized) == (
        "transcoder",
        SourceKind.DEMO,
        "transcoder:demo",
    )


@pytest.mark.parametrize(
    ("raw", "repo", "subdir", "rev"),
    [
        ("clt:hf:org/repo", "org/repo", None, None),
        ("clt:hf:org/repo@v1.0", "org/repo", None, "v1.0"),
        ("clt:hf:org/repo/layer_3/sub", "org/repo", "layer_3/sub", None),
        ("clt:hf:org/my.repo-x/sub@abc123", "org/my.repo-x", "sub", "abc123"),
    ],
)
def test_hf(raw: str, repo: str, subdir: str | None, rev: str | None) -> None:
    did = parse(raw)
    assert did.kind is SourceKind.HF
    assert (did.hf_repo, did.hf_subdir, did.hf_revision) == (repo, subdir, rev)
    assert did.normalized == raw


def test_wandb() -> None:
    did = parse("spd:wandb:goodfire/spd/abc123")
    assert did.kind is SourceKind.WANDB and did.wandb_path == "goodfire/spd/abc123"


def test_short_ids_bare_and_prefixed() -> None:
    bare = parse("s-1a2b3c4d")
    prefixed = parse("spd:s-1a2b3c4d")
    assert bare.method == prefixed.method == "spd"
    assert bare.kind is prefixed.kind is SourceKind.SHORT
    assert bare.normalized == prefixed.normalized == "spd:s-1a2b3c4d"
    assert bare.storage_key == prefixed.storage_key


def test_local_paths_normalise_to_the_same_key(tmp_path: Path) -> None:
    (tmp_path / "tc").mkdir()
    rel = parse("transcoder:tc", cwd=tmp_path)
    absolute = parse(f"transcoder:{tmp_path / 'tc'}")
    dotted = parse("transcoder:./x/../tc", cwd=tmp_path)
    assert rel.kind is SourceKind.LOCAL
    assert (
        rel.normalized
        == absolute.normalized
        == dotted.normalized
        == f"transcoder:{tmp_path / 'tc'}"
    )
    assert rel.storage_key == absolute.storage_key


def test_storage_key_is_filesystem_safe_and_distinct() -> None:
    a = parse("clt:hf:org/repo@v1").storage_key
    b = parse("clt:hf:org/repo@v2").storage_key
    assert a != b
    for key in (a, b):
        assert "/" not in key and ":" not in key and "@" not in key


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("nonsense", "is not a decomposition ID"),
        ("foo:demo", "unknown method 'foo'"),
        ("Bad Method:demo", "not a valid method name"),
        ("clt:hf:justone", "is not a Hub source"),
        ("spd:wandb:only/two", "is not a wandb source"),
        ("transcoder:", "is not a decomposition ID"),
    ],
)
def test_bad_ids_list_methods_and_forms(raw: str, fragment: str) -> None:
    with pytest.raises(DecompositionIdError) as info:
        parse(raw)
    text = str(info.value)
    assert fragment in text
    assert "clt, spd, transcoder" in text
    assert "<method>:hf:<owner>/<repo>" in text


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    did = parse("transcoder:nope", cwd=tmp_path)
    with pytest.raises(SourceNotFoundError, match="no such file or directory"):
        fetch_source(did)


def test_hf_source_resolves_from_offline_cache(offline_hub: Path) -> None:
    """A Hub repo already in the local cache resolves offline (cache layout built by hand)."""
    add_to_offline_hub(offline_hub, "org/repo", {"sub/cfg.json": "{}", "other/x.txt": "x"})
    path = fetch_source(parse("transcoder:hf:org/repo/sub"))
    assert path.name == "sub"
    assert (path / "cfg.json").read_text() == "{}"


def test_hf_missing_subdir_lists_entries(offline_hub: Path) -> None:
    add_to_offline_hub(offline_hub, "org/repo", {"sub/cfg.json": "{}"})
    with pytest.raises(SourceNotFoundError, match="not found in Hub repo"):
        fetch_source(parse("transcoder:hf:org/repo/absent"), allow_patterns=["*"])


def test_hf_source_not_cached_offline_says_so(offline_hub: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="not in the local cache"):
        fetch_source(parse("transcoder:hf:org/absent"))
