"""Hostile inputs to the command line, in one table: each must end in a one-line ``error:``
naming what was wrong (and a hint), a non-zero exit, and no traceback.

To add a case, add a row to ``CASES``: an ID, a function from the test's temporary directory
to the argument list, and a fragment the error line must contain. Cases that need files build
them under that directory; none needs a network, a key or a harvest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from typer.testing import CliRunner

from spd_host.cli.app import app


class Case(NamedTuple):
    id: str
    argv: Callable[[Path], list[str]]
    fragment: str


def _file(tmp: Path) -> str:
    f = tmp / "a_file"
    f.write_text("not a directory")
    return str(f)


def _bomb_run(tmp: Path) -> str:
    """An SPD run directory whose final_config.yaml is an alias bomb (9**9 strings)."""
    import shutil

    from spd_adapters.spd.adapter import demo_run_dir

    run = tmp / "bomb_run"
    shutil.copytree(demo_run_dir(), run)
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cfg = run / "final_config.yaml"
    cfg.write_text("\n".join(lines) + "\n" + cfg.read_text())
    return f"spd:{run}"


def _pipeline_run(tmp: Path) -> str:
    """An SPD run directory naming a transformers *function* as its model class."""
    import shutil

    from spd_adapters.spd.adapter import demo_run_dir

    run = tmp / "pipeline_run"
    shutil.copytree(demo_run_dir(), run)
    cfg = run / "final_config.yaml"
    text = cfg.read_text()
    assert "pretrained_model_class: transformers.GPT2LMHeadModel" in text
    cfg.write_text(text.replace("transformers.GPT2LMHeadModel", "transformers.pipeline"))
    return f"spd:{run}"


def _jsonl(tmp: Path) -> str:
    f = tmp / "docs.jsonl"
    f.write_text('{"body": "some text to tokenize"}\n')
    return str(f)


def _stored_result(tmp: Path) -> str:
    """A finished harvest of ``transcoder:org/my-saes`` in this test's home; the typo of its ID."""
    meta = (
        Path(os.environ["SPD_HOST_HOME"]) / "results" / "x" / "harvest" / "run-1" / "harvest.json"
    )
    meta.parent.mkdir(parents=True)
    meta.write_text('{"decomposition_id": "transcoder:org/my-saes"}')
    return "transcodr:org/my-saes"


H = ["harvest", "transcoder:demo"]
A = ["autointerp", "transcoder:demo", "--no-progress"]

CASES = [
    # harvest options the config model rejects
    Case("harvest --n-tokens 0", lambda t: [*H, "--n-tokens", "0"], "invalid --n-tokens 0"),
    Case("harvest --batch-size 0", lambda t: [*H, "--batch-size", "0"], "invalid --batch-size 0"),
    Case("harvest --seq-len 1", lambda t: [*H, "--seq-len", "1"], "invalid --seq-len 1"),
    Case("harvest --examples 0", lambda t: [*H, "--examples-per-component", "0"], "invalid --examples-per-component 0"),
    Case("harvest --context-tokens -1", lambda t: [*H, "--context-tokens", "-1"], "invalid --context-tokens -1"),
    Case("harvest --threshold nan", lambda t: [*H, "--threshold", "nan"], "invalid --threshold nan"),
    Case("harvest --threshold inf", lambda t: [*H, "--threshold", "inf"], "invalid --threshold inf"),
    # harvest options checked against the model / the machine
    Case("harvest --seq-len past positions", lambda t: [*H, "--seq-len", "100000", "--out", str(t / "o")], "longer than the model's context"),
    Case("harvest --context-tokens 100000", lambda t: [*H, "--context-tokens", "100000", "--out", str(t / "o")], "invalid --context-tokens 100000"),
    Case("harvest --out a file", lambda t: [*H, "--out", _file(t)], "exists and is not a directory"),
    Case("harvest --out /dev/null", lambda t: [*H, "--out", "/dev/null"], "/dev/null exists and is not a directory"),
    Case("harvest --out ~nosuchuser", lambda t: [*H, "--out", "~nosuchuser-spd/x"], "'~' is unknown"),
    Case("harvest --out under a file", lambda t: [*H, "--out", _file(t) + "/sub"], "cannot be written"),
    # places even root cannot write (permission bits say yes to root; the kernel says no)
    Case("harvest --out under /proc", lambda t: [*H, "--out", "/proc/spd-host-test/run"], "--out /proc/spd-host-test/run cannot be written"),
    Case("harvest --out under /sys", lambda t: [*H, "--out", "/sys/spd-host-test"], "--out /sys/spd-host-test cannot be written"),
    Case("dashboard --out a file", lambda t: ["dashboard", "transcoder:demo", "--out", _file(t)], "exists and is not a directory"),
    Case("dashboard --out under /proc", lambda t: ["dashboard", "transcoder:demo", "--out", "/proc/spd-host-test"], "cannot be written"),
    Case("export neuronpedia --out a file", lambda t: ["export", "neuronpedia", "transcoder:demo", "--out", _file(t)], "exists and is not a directory"),
    Case("export circuit-tracer --out under /sys", lambda t: ["export", "circuit-tracer", "transcoder:demo", "--out", "/sys/spd-host-test"], "cannot be written"),
    Case("harvest --dataset ~nosuchuser", lambda t: [*H, "--dataset", "~nosuchuser-spd/c.txt", "--out", str(t / "o")], "does not exist on this machine"),
    # autointerp options
    Case("autointerp --cost-cap -1", lambda t: [*A, "--cost-cap", "-1"], "invalid --cost-cap -1"),
    Case("autointerp --cost-cap nan", lambda t: [*A, "--cost-cap", "nan"], "invalid --cost-cap nan: must be a finite number"),
    Case("autointerp --timeout 0", lambda t: [*A, "--timeout", "0"], "invalid --timeout 0"),
    Case("autointerp --limit -1", lambda t: [*A, "--limit", "-1"], "invalid --limit -1"),
    Case("autointerp --max-attempts 0", lambda t: [*A, "--max-attempts", "0"], "invalid --max-attempts 0"),
    Case("autointerp --rpm nan", lambda t: [*A, "--rpm", "nan"], "invalid --rpm nan"),
    Case("autointerp --input-price -1", lambda t: [*A, "--input-price", "-1"], "invalid --input-price -1"),
    Case("autointerp --max-output-tokens 1", lambda t: [*A, "--max-output-tokens", "1"], "invalid --max-output-tokens 1"),
    # eval options
    Case("eval fidelity --n-tokens 0", lambda t: ["eval", "fidelity", "transcoder:demo", "--n-tokens", "0"], "invalid --n-tokens 0"),
    Case("eval fidelity --batch-size 0", lambda t: ["eval", "fidelity", "transcoder:demo", "--batch-size", "0"], "invalid --batch-size 0"),
    Case("eval fidelity --seq-len past positions", lambda t: ["eval", "fidelity", "transcoder:demo", "--seq-len", "100000"], "--seq-len: seq_len 100000 is longer than the model's context"),
    Case("eval fidelity --text-column missing", lambda t: ["eval", "fidelity", "transcoder:demo", "--dataset", _jsonl(t), "--text-column", "nosuch"], "has no 'nosuch' field"),
    Case("harvest --text-column missing", lambda t: [*H, "--dataset", _jsonl(t), "--text-column", "nosuch", "--out", str(t / "o")], "has no 'nosuch' field"),
    Case("eval intruder --cost-cap nan", lambda t: ["eval", "intruder", "transcoder:demo", "--cost-cap", "nan"], "invalid --cost-cap nan"),
    Case("eval intruder --timeout 0", lambda t: ["eval", "intruder", "transcoder:demo", "--timeout", "0"], "invalid --timeout 0"),
    Case("eval detection --rpm nan", lambda t: ["eval", "detection", "transcoder:demo", "--rpm", "nan"], "invalid --rpm nan"),
    Case("eval fuzzing --max-output-tokens 1", lambda t: ["eval", "fuzzing", "transcoder:demo", "--max-output-tokens", "1"], "invalid --max-output-tokens 1"),
    Case("eval detection --input-price -1", lambda t: ["eval", "detection", "transcoder:demo", "--input-price", "-1"], "invalid --input-price -1"),
    Case("eval fuzzing --price-per-mtok x", lambda t: ["eval", "fuzzing", "transcoder:demo", "--price-per-mtok", "x"], "--price-per-mtok"),
    Case("eval intruder --label-model", lambda t: ["eval", "intruder", "transcoder:demo", "--label-model", "m"], "--label-model does not apply to intruder"),
    # IDs and files
    Case("id with ~nosuchuser", lambda t: ["info", "transcoder:~nosuchuser-spd/x"], "does not exist on this machine"),
    Case("typo of a demo", lambda t: ["info", "transcoder:dmeo"], "Did you mean 'transcoder:demo'?"),
    Case("typo of a method", lambda t: ["info", "transcodr:demo"], "Did you mean 'transcoder:demo'?"),
    Case("typo of a stored result", lambda t: ["info", _stored_result(t)], "Did you mean 'transcoder:org/my-saes'?"),
    Case("YAML alias bomb", lambda t: ["info", _bomb_run(t)], "alias bomb"),
    Case("pretrained_model_class pipeline", lambda t: ["topology", "demo", "--json"] if False else ["eval", "fidelity", _pipeline_run(t), "--n-tokens", "64"], "not a transformers model class"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_a_one_line_error(case: Case, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, case.argv(tmp_path))
    out = result.output
    assert result.exit_code not in (0, None), out
    assert isinstance(result.exception, SystemExit), f"{type(result.exception)}: {out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert case.fragment in errors[0], out  # on the one line, not wrapped onto the next


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_directory_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    result = CliRunner().invoke(app, [*H, "--out", str(ro / "x")])
    assert result.exit_code == 1 and "cannot be written" in result.output


def test_a_plugin_calling_sys_exit_at_import_is_a_plugin_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from spd_host.plugins import reset_host
    from tests.core.test_plugins import install_fake_distribution

    install_fake_distribution(
        tmp_path,
        "spd-host-exits",
        {"toy_exits": "import sys\nsys.exit(3)\n"},
        {"toy_exits": "toy_exits"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_exits", None)
    reset_host()
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert '"toy_exits"' in result.output and "SystemExit: 3" in result.output
    # every other command still works
    assert CliRunner().invoke(app, ["info", "transcoder:demo", "--json"]).exit_code == 0


def test_a_second_harvest_of_the_same_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    from spd_host.locking import RunLock

    out = tmp_path / "run"
    with RunLock(out / ".harvest.lock", "harvest held by this test"):
        result = CliRunner().invoke(app, [*H, "--out", str(out), "--n-tokens", "256"])
    assert result.exit_code == 1, result.output
    assert (
        f"another harvest of transcoder:demo into {out} is running (pid {os.getpid()})"
        in result.output
    )
    assert "Traceback" not in result.output


def test_version_and_short_help_and_80_columns() -> None:
    from spd_host import __version__

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == f"spd-host {__version__}"
    for argv in (
        ["-h"],
        ["harvest", "-h"],
        ["autointerp", "-h"],
        ["eval", "intruder", "-h"],
        ["show", "-h"],
    ):
        result = runner.invoke(app, argv, env={"COLUMNS": "200"})  # a wide terminal
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80, (argv, result.output)
