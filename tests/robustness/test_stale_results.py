"""Never a stale or damaged result returned as fine: sub-runs are keyed on fingerprints of the
decomposition's files and the dataset, ``--force`` recomputes, and a damaged sub-run is a
clear error saying to re-run with ``--force``."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from spd_host.errors import FormatError
from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin
from tests.robustness import local_toy

CONFIG = dict(n_tokens=192, batch_size=4, seq_len=12, examples_per_component=3, context_tokens=2)


@pytest.fixture
def decomposition(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "decomp"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00" * 1000)
    (d / "config.json").write_text('{"d": 8}')
    with temporary_plugins(("ltoy", local_toy), entry_points=False):
        yield d


def _harvest(d: Path, **kw: object) -> HarvestRepo:
    config = HarvestConfig(**{**CONFIG, **kw.pop("config", {})})  # type: ignore[arg-type]
    repo = run_harvest(
        f"ltoy:{d}", config, batches=toy_plugin.toy_source(4, 12), progress=False, **kw
    )  # type: ignore[arg-type]
    assert repo is not None
    return repo


def test_same_inputs_reuse_the_run_and_say_so(decomposition: Path) -> None:
    first = _harvest(decomposition)
    again = _harvest(decomposition)
    assert not first.reused and again.reused and again.path == first.path


def test_changed_weights_give_a_new_run(decomposition: Path) -> None:
    first = _harvest(decomposition)
    (decomposition / "weights.bin").write_bytes(b"\x01" * 1000)  # same size, new content
    second = _harvest(decomposition)
    assert not second.reused and second.path != first.path


def test_a_touched_file_of_the_same_content_gives_a_new_run_too(decomposition: Path) -> None:
    first = _harvest(decomposition)
    st = (decomposition / "config.json").stat()
    os.utime(decomposition / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _harvest(decomposition).path != first.path  # cheap key: mtime counts


def test_changed_dataset_file_gives_a_new_run(decomposition: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three\n")
    first = _harvest(decomposition, config={"dataset": str(corpus)})
    corpus.write_text("one two three four\n")
    second = _harvest(decomposition, config={"dataset": str(corpus)})
    assert second.path != first.path and not second.reused


def test_force_recomputes_in_place(decomposition: Path) -> None:
    first = _harvest(decomposition)
    stamp = (first.path / "harvest.json").stat().st_mtime_ns
    (first.path / "stats.safetensors").write_bytes(b"garbage")  # damaged...
    forced = _harvest(decomposition, force=True)  # ...and recomputed, not re-read
    assert forced.path == first.path and not forced.reused
    assert (forced.path / "harvest.json").stat().st_mtime_ns > stamp
    assert forced.summary() == first.summary()


def _truncate(name: str, keep: int):  # type: ignore[no-untyped-def]
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])

    return damage


def _edit_meta(fn):  # type: ignore[no-untyped-def]
    def damage(run: Path) -> None:
        doc = json.loads((run / "harvest.json").read_text())
        fn(doc)
        (run / "harvest.json").write_text(json.dumps(doc))

    return damage


def _drop_rows(run: Path) -> None:
    con = sqlite3.connect(run / "harvest.db")
    con.execute("DELETE FROM components WHERE gidx > 3")
    con.commit()
    con.close()


def _swap_files(run: Path) -> None:  # a stats file from a run with another layout
    (run / "examples.safetensors").write_bytes((run / "stats.safetensors").read_bytes())


DAMAGE = {
    "harvest.json not JSON": lambda run: (run / "harvest.json").write_text("{ not json"),
    "harvest.json a list": lambda run: (run / "harvest.json").write_text("[1, 2]"),
    "harvest.json binary": lambda run: (run / "harvest.json").write_bytes(b"\xff\xfe\x00"),
    "layout missing": _edit_meta(lambda d: d.pop("layout")),
    "layout sizes not numbers": _edit_meta(lambda d: d["layout"].update(sizes=["x"])),
    "n_tokens negative": _edit_meta(lambda d: d.update(n_tokens=-5)),
    "layout larger than the files": _edit_meta(lambda d: d["layout"].update(sizes=[7, 6])),
    "stats truncated": _truncate("stats.safetensors", -1),
    "stats empty": _truncate("stats.safetensors", 0),
    "stats header cut": _truncate("stats.safetensors", 12),
    "examples truncated": _truncate("examples.safetensors", -1),
    "examples from another file": _swap_files,
    "db missing": lambda run: (run / "harvest.db").unlink(),
    "db not sqlite": lambda run: (run / "harvest.db").write_bytes(b"x" * 4096),
    "db rows missing": _drop_rows,
    "stats missing": lambda run: (run / "stats.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_run_is_a_clear_error_saying_force(decomposition: Path, damage) -> None:  # type: ignore[no-untyped-def]
    run = _harvest(decomposition).path
    damage(run)
    with pytest.raises(FormatError) as err:
        HarvestRepo(run)
    assert str(run) in err.value.message and "--force" in (err.value.hint or "")
    with pytest.raises(FormatError):  # a re-run does not report the damaged run as fine
        _harvest(decomposition)
    assert _harvest(decomposition, force=True).summary()  # and --force repairs it


def test_a_newer_schema_version_says_force(decomposition: Path) -> None:
    run = _harvest(decomposition).path
    _edit_meta(lambda d: d.update(schema_version=999))(run)
    with pytest.raises(FormatError, match="schema version 999") as err:
        HarvestRepo(run)
    assert "--force" in (err.value.hint or "")


@pytest.mark.slow
def test_cli_says_when_it_reuses_a_harvest_and_force_recomputes() -> None:
    from typer.testing import CliRunner

    from spd_host.cli.app import app

    argv = [
        "harvest",
        "transcoder:demo",
        "--n-tokens",
        "256",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    ]
    runner = CliRunner()
    first = runner.invoke(app, argv)
    assert first.exit_code == 0, first.output
    assert "using cached harvest" not in first.output
    # how the tokens were made is recorded: the demo's GPT-2 tokenizer separates documents with
    # its EOS (<|endoftext|>) and never prepends a BOS
    from spd_host.harvest import HarvestRepo
    from spd_host.models import load_tokenizer

    tok = load_tokenizer("demo")
    rec = HarvestRepo.open("transcoder:demo").meta["tokenization"]
    assert rec["boundary_token"] == "eos" and rec["boundary_token_id"] == tok.eos_token_id
    assert rec["bos_at_sequence_start"] is False
    again = runner.invoke(app, argv)
    assert again.exit_code == 0, again.output
    (line,) = [x for x in again.output.splitlines() if "using cached harvest" in x]
    assert line.startswith("using cached harvest run-") and "(made 20" in line and "--force" in line
    forced = runner.invoke(app, [*argv, "--force"])
    assert forced.exit_code == 0 and "using cached harvest" not in forced.output
