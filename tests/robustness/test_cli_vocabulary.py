"""One flag vocabulary across the commands that share a concept, and help that fits 80
columns on every command, however wide the terminal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from spd_host.cli.app import app

# the flag -> the commands it must be on (each means the same thing everywhere)
JUDGES = (("eval", "intruder"), ("eval", "detection"), ("eval", "fuzzing"))
LLM = (("autointerp",), *JUDGES)
VOCABULARY: dict[str, tuple[tuple[str, ...], ...]] = {
    "--provider": (*LLM, ("show",)),
    "--model": (*LLM, ("show",)),
    "--label-model": (("autointerp",), ("eval", "detection"), ("eval", "fuzzing"), ("show",)),
    "--cost-cap": LLM,
    "--no-cost-cap": LLM,
    "--timeout": LLM,
    "--max-attempts": LLM,
    "--max-concurrent": LLM,
    "--rpm": LLM,
    "--base-url": LLM,
    "--api-key-env": LLM,
    "--input-price": LLM,
    "--output-price": LLM,
    "--price-per-mtok": LLM,
    "--max-output-tokens": LLM,
    "--max-retry-after": LLM,
    "--run": (*LLM, ("show",), ("harvest", "merge")),
    "--batch": (*LLM, ("eval", "simulation")),
    "--poll-interval": (*LLM, ("eval", "simulation")),
    "--list-batches": (*LLM, ("eval", "simulation")),
    "--cancel-batches": (*LLM, ("eval", "simulation")),
    "--force": (("harvest", "run"), *LLM),
    "--json": (("harvest", "run"), *LLM, ("show",), ("eval", "fidelity")),
    "--base-model": (("harvest", "run"), *LLM, ("show",), ("eval", "fidelity"), ("info",)),
    "--prepend-bos": (("harvest", "run"), ("eval", "fidelity"), ("eval", "run"), ("eval", "all")),
    "--text-column": (("harvest", "run"), ("eval", "fidelity"), ("eval", "run"), ("eval", "all")),
}


# typer vendors its own click: commands and options are read by duck type, not click classes
def _root() -> Any:
    return typer.main.get_command(app)


def _command(path: tuple[str, ...]) -> Any:
    cmd = _root()
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option"]


def _flags(cmd: Any) -> set[str]:
    out: set[str] = set()
    for p in _options(cmd):
        out.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return out


def _all_commands() -> Iterator[tuple[str, ...]]:
    def walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, (*path, name))

    yield from walk(_root(), ())


@pytest.mark.parametrize("flag", list(VOCABULARY))
def test_one_flag_vocabulary(flag: str) -> None:
    missing = [" ".join(p) for p in VOCABULARY[flag] if flag not in _flags(_command(p))]
    assert not missing, f"{flag} missing on: {missing}"


def _kind(option: Any) -> str:
    if option.is_flag:
        return "flag"
    return repr(option.type_descriptor.annotation).replace(" | None", "").replace("<class ", "")


def test_a_flag_means_one_value_kind_everywhere() -> None:
    """The same flag takes the same kind of value (a float cap, an int attempt count...)."""
    kinds: dict[str, set[str]] = {}
    for path in _all_commands():
        for p in _options(_command(path)):
            for o in p.opts:
                kinds.setdefault(o, set()).add(_kind(p))
    mixed = {f: k for f, k in kinds.items() if len(k) > 1}
    assert not mixed, mixed


@pytest.mark.parametrize("path", list(_all_commands()), ids=lambda p: " ".join(p) or "spd-host")
def test_help_fits_80_columns_on_every_command(path: tuple[str, ...]) -> None:
    argv = [*path, "-h"] if path[:1] != ("harvest",) or path[1:] else ["harvest", "-h"]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    widest = max(result.output.splitlines(), key=len)
    assert len(widest) <= 80, (path, widest)
